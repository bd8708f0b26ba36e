class Subcommand:
    """Base of the ``tune-moe`` subcommands, the same as torchtune's ``torchtune._cli.subcommand.Subcommand``.

    Not imported from torchtune because ``import torchtune`` loads torch and torchao (several seconds and
    warnings), which `tune-moe ls`/`cp`/`plot` do not need.
    """

    def __init__(self, *args, **kwargs):
        pass

    @classmethod
    def create(cls, *args, **kwargs):
        return cls(*args, **kwargs)
