"""Apache Airflow provider bringing two of Kestra's performance ideas to Airflow 3."""

from __future__ import annotations

__version__ = "0.1.0"
