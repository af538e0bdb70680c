"""Foundation: reading what rosafx is given, writing files whole (temporary name + rename), and
the rule for what a command may overwrite. Imports nothing of rosafx but ``rosafx.errors``."""
