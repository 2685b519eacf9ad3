"""Bad input: which errors are the user's, how the project's own files are read, how a script says so.

  - BAD_INPUT: the exception types raised for input the code cannot use: ValueError for content
    (a key missing, a value out of range, NaN where numbers must be finite), OSError for files and
    the environment (missing, unreadable, a simulator not installed). Their messages name the file,
    the key and what was expected. `--skip-bad` skips samples that raise them (data.py).
  - read_file / read_json: every checkpoint, config, stats, recipe and train-state file is read
    through read_file, so a missing, truncated or foreign file ends in one line naming the path and
    what it should hold, whatever the decoder (JSON, safetensors, torch, tokenizer) raised.
  - cli: every script's entry point. BAD_INPUT becomes `error: ...` on stderr and exit status 1;
    any other exception is a bug in this code and keeps its traceback.
  - at_least: argparse types for numbers that cannot be right below a bound (steps, episodes,
    batch sizes), refused before any work with argparse's usage line (exit status 2).
"""
import argparse
import json
import math
import os
import sys

BAD_INPUT = (ValueError, OSError)


def read_file(path, expected, load):
    """load(path), or one line naming `path` and `expected` (what the file should hold) when the
    file is missing or `load` cannot decode it. `load` only decodes; checks of the content belong
    to the caller, whose messages already name the path."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: file not found; expected {expected}")
    try:
        return load(path)
    except Exception as e:  # each decoder raises its own types (JSONDecodeError, SafetensorError, zip/pickle errors)
        reason = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{path}: cannot read {expected} ({type(e).__name__}: {reason}); "
                         "the file may be truncated or corrupt") from e


def load_json(path):
    with open(path) as f:
        return json.load(f)


def read_json(path, expected="a JSON file"):
    return read_file(path, expected, load_json)


def cli(main, argv=None):
    """Run a script's main(argv) as a command: the project's input errors (BAD_INPUT) end in one
    `error: ...` line and exit status 1, Ctrl-C in status 130."""
    try:
        return main(argv)
    except BAD_INPUT as e:
        sys.exit(f"error: {_own_message(e)}")
    except KeyboardInterrupt:
        sys.exit(130)


def _own_message(e):
    """A DataLoader worker re-raises a sample's error as the same type with the worker's traceback in
    the message ('Caught ValueError in DataLoader worker process 0. Original Traceback ...'): keep
    the original message, its last part."""
    text = str(e)
    marker = f"\n{type(e).__name__}: "
    if text.startswith("Caught ") and "Original Traceback" in text and marker in text:
        return text.rsplit(marker, 1)[1].strip()
    return text


def at_least(low, kind=int, strict=False):
    """argparse type: a finite `kind` number >= low (> low with `strict`)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not (math.isfinite(value) and (value > low if strict else value >= low)):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got {text}")
        return value
    return parse
