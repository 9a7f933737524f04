"""The one error a bad config raises: it names the key, the bad value and a fix."""


class ConfigError(ValueError):
    def __init__(self, key: str, value: object, fix: str) -> None:
        self.key, self.value, self.fix = key, value, fix
        super().__init__(f"{key}={value!r}: {fix}")
