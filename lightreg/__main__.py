"""``python -m lightreg``: the same as the ``lightreg-train`` console script."""

if __name__ == "__main__":
    from lightreg.app.cli import main

    main()
