"""What builds an adapted model: from rules (``transform``) or from an adapter directory
(``serialize.load``, ``peft_format.load_peft``), captured whole or in parts (``partial``)."""
