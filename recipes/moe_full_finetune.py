def main():
    print("recipe placeholder")

if __name__ == "__main__":
    main()
