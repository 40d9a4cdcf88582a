"""``python -m trainer {features,train,eval}``."""

from trainer.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
