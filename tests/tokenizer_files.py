"""Small tokenizer files built offline with the ``tokenizers`` library (and sentencepiece), for tokenizer tests."""

import json
from pathlib import Path

CORPUS = [
    "hello world, the tokens of a tiny tokenizer",
    "spaces\tand\nnewlines 123 4567 and more words",
    "the quick brown fox jumps over the lazy dog",
    "user assistant system tool call think",
] * 20

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]


def write_qwen_tokenizer(path: Path, extra_special=()) -> dict:
    """vocab.json + merges.txt (byte-level BPE) and a tokenizer.json with Qwen's special tokens after the vocab
    (as the real files have them). Returns the paths and ``special`` (token -> id)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers, Regex

    # Qwen2's pre-tokenizer: its split regex, then byte-level without the GPT-2 regex.
    pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(QWEN_SPECIAL + list(extra_special))
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    tok.model.save(str(path))  # vocab.json, merges.txt
    special = {t: tok.token_to_id(t) for t in QWEN_SPECIAL + list(extra_special)}
    return {
        "vocab": path / "vocab.json",
        "merges": path / "merges.txt",
        "tokenizer_json": path / "tokenizer.json",
        "special": special,
    }


def write_olmoe_tokenizer(path: Path) -> dict:
    """A GPT-NeoX style tokenizer.json (byte-level BPE) with OLMo's EOS and pad tokens and no BOS, plus
    tokenizer_config.json and generation_config.json as OLMoE ships them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(["|||IP_ADDRESS|||", "<|padding|>"])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    eos, pad = tok.token_to_id("|||IP_ADDRESS|||"), tok.token_to_id("<|padding|>")
    (path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": None, "eos_token": "|||IP_ADDRESS|||", "pad_token": "<|padding|>"})
    )
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "pad_token_id": pad}))
    return {
        "tokenizer_json": path / "tokenizer.json",
        "tokenizer_config": path / "tokenizer_config.json",
        "generation_config": path / "generation_config.json",
        "eos": eos,
        "pad": pad,
    }


def write_sentencepiece_model(path: Path) -> Path:
    """A tiny SentencePiece BPE model with Llama/Mistral's special ids (unk 0, bos 1, eos 2)."""
    import sentencepiece as spm

    path.mkdir(parents=True, exist_ok=True)
    corpus = path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(path / "tokenizer"), vocab_size=400, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, minloglevel=2,
    )
    return path / "tokenizer.model"
