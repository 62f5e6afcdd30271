"""`python -m bench.identity`: run the identity benchmark."""

from bench.identity.run import main

if __name__ == "__main__":  # the benchmark's worker processes are spawned: they must not run it again
    main()
