"""`python -m bench.identity`: run the identity benchmark."""

from bench.identity.run import main

main()
