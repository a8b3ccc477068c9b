"""The one exception type for bad user input: the CLI prints its message as one line."""


class UserError(Exception):
  """Bad input (config, dataset, checkpoint, flags): one clear message, non-zero exit."""
