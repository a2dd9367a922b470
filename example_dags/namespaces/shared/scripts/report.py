"""Sum the sales CSV files staged beside this script and write report.txt."""

import json
import sys
from pathlib import Path

from common import load_rows

settings = json.loads(Path("config/settings.json").read_text())
rows = load_rows(sorted(Path("data").glob("*.csv")))
total = sum(float(row["amount"]) for row in rows)
currency = settings["currency"]
Path("report.txt").write_text(f"{settings['team']}: {len(rows)} sales, {total:.2f} {currency}\n")
print(Path("report.txt").read_text(), end="")

# The example doubles as a check of include, exclude and override order.
problems = [
    name for name in ("docs", "scratch.tmp", ".env") if Path(name).exists()
]
if settings["team"] != "team-a":
    problems.append("config/settings.json was not overridden by the team-a namespace")
if len(rows) != 6:
    problems.append(f"expected 6 rows from two quarters, found {len(rows)}")
if problems:
    sys.exit(f"unexpected staging result: {problems}")
