"""
Reading and validating one ``airflow.cfg`` section that the provider declares.

Each capability declares its section once, in the format of ``get_provider_info()["config"]``, and
reads it through :class:`ConfigSection`, so a value comes from one place: an explicit argument, then
``airflow.cfg`` or its ``AIRFLOW__SECTION__OPTION`` variable, then the declared default. The default
is taken from the declaration rather than from Airflow, so a process that has not loaded provider
configuration resolves the same value.

This module imports nothing from Airflow at import time: ``get_provider_info()`` imports the
settings modules while Airflow is still loading its own configuration.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

_TRUE = frozenset({"true", "t", "1", "yes", "y", "on"})
_FALSE = frozenset({"false", "f", "0", "no", "n", "off"})


class ConfigSection:
    """
    One declared config section: its values, and errors that name the option, value and fix.

    :param name: the section name, such as ``namespace_files``.
    :param declaration: the section as ``get_provider_info()`` publishes it.
    :param error: builds the exception for an invalid value from its message. It is called only
        when a value is invalid, so the exception class may live in a module that imports Airflow.
    """

    def __init__(self, name: str, declaration: Mapping[str, Any], error: Callable[[str], Exception]) -> None:
        self.name = name
        self.declaration = declaration
        self._error = error

    def default(self, option: str) -> Any:
        return self.declaration["options"][option]["default"]

    def read(self, option: str, override: Any = None, config: Any = None) -> Any:
        """
        Return ``override`` if given, else the configured value, else the declared default.

        :param config: an Airflow config parser; the SDK's ``conf`` when omitted.
        """
        if override is not None:
            return override
        if config is None:
            try:
                from airflow.sdk.configuration import conf as config
            except ImportError:  # Outside an Airflow installation, the declared defaults apply.
                return self.default(option)
        value = config.get(self.name, option, fallback=None)
        if value is None or (isinstance(value, str) and value.strip() == ""):
            return self.default(option)
        return value

    def invalid(self, option: str, value: Any, expected: str) -> Exception:
        """Return the error for an invalid value, naming where to fix it."""
        variable = f"AIRFLOW__{self.name.upper()}__{option.upper()}"
        return self._error(
            f"Invalid [{self.name}] {option} = {value!r}: expected {expected}. "
            f"Fix it in airflow.cfg or in the environment variable {variable}."
        )

    def parse_bool(self, option: str, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise self.invalid(option, value, "True or False")

    def parse_int(self, option: str, value: Any, minimum: int, maximum: int | None = None) -> int:
        expected = (
            f"a whole number >= {minimum}" if maximum is None else f"a whole number from {minimum} to {maximum}"
        )
        try:
            number = int(str(value).strip())
        except ValueError:
            raise self.invalid(option, value, expected) from None
        if number < minimum or (maximum is not None and number > maximum):
            raise self.invalid(option, value, expected)
        return number

    def parse_float(
        self, option: str, value: Any, minimum: float, maximum: float | None = None, unit: str = "a number"
    ) -> float:
        expected = f"{unit} >= {minimum}" if maximum is None else f"{unit} from {minimum} to {maximum}"
        try:
            number = float(str(value).strip())
        except ValueError:
            raise self.invalid(option, value, expected) from None
        if not math.isfinite(number) or number < minimum or (maximum is not None and number > maximum):
            raise self.invalid(option, value, expected)
        return number
