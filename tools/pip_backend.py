"""A PEP 517 build backend that refuses to build: this repository is cloned and run, not installed (README.md).

Every hook pip (or `python -m build`) may call first stops with one line saying what to run instead, and exit
status 1; nothing is built or installed.
"""
import sys

MESSAGE = ("error: gcn-segmentation is cloned and run, not installed (its programs, train.py, evaluate.py, "
           "predict.py, ..., run from the clone beside experiments/): in the clone, pip install -r requirements.txt "
           "(contributors: pip install -r requirements-dev.txt)")


def refuse(*_args, **_kwargs) -> None:
    sys.exit(MESSAGE)


get_requires_for_build_wheel = get_requires_for_build_sdist = get_requires_for_build_editable = refuse
prepare_metadata_for_build_wheel = prepare_metadata_for_build_editable = refuse
build_wheel = build_sdist = build_editable = refuse
