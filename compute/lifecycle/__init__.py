"""The lifecycle driver (supervised program `lifecycle`): the only program that changes postgres or storage."""
