"""LoRA adapters: attaching them with peft, the kohya file format, and the files generate loads."""
