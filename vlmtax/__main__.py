"""`python -m vlmtax` runs the CLI (used by `accelerate launch -m vlmtax sft ...`)."""

from vlmtax.cli import main

main()
