"""Helpers shared by the example's scripts."""

import csv


def load_rows(paths):
    rows = []
    for path in paths:
        with open(path, newline="") as handle:
            rows.extend(csv.DictReader(handle))
    return rows
