"""Progress bars with an ETA on long work, as a user sees them in a terminal (a pseudo-terminal here), and none in a
pipe or a Slurm output file, where the log lines stay."""
from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
from PIL import Image

import predict
import train
import utils
from test_predict import smooth_image, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
BAR = "%|"  # between a bar's percentage and its bar: tqdm's and nothing else's


def in_a_terminal(*args: str, columns: int = 120, timeout: float = 300) -> tuple[int, str]:
    """Run python with `args` with stdout and stderr on a pseudo-terminal of `columns` columns, as from a shell: its
    exit status and everything it drew there."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 30, columns, 0, 0))
    process = subprocess.Popen([sys.executable, *args], cwd=REPO, stdin=subprocess.DEVNULL, stdout=terminal,
                               stderr=terminal, env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.close(terminal)
    drawn, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([controller], [], [], 1.0)[0]:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # EIO: the program has exited and closed the terminal
                    break
                if not chunk:
                    break
                drawn += chunk
        return process.wait(timeout=10), drawn.decode(errors="replace")
    finally:
        process.kill()
        os.close(controller)


def test_train_and_evaluate_draw_bars_on_a_terminal_that_end_with_the_budget(experiment):
    """A run that num_iterations ends mid-epoch: the epoch's bar counts the 1 step it trains, not the epoch's 4 (it
    would stop at 25 % as if the run had died); validation and evaluate.py (with TTA) count their images."""
    model_dir = experiment(num_iterations=1)
    status, drawn = in_a_terminal("train.py", "--model_dir", str(model_dir))
    assert status == 0, drawn[-3000:]
    assert "epoch 1/1:   0%|" in drawn and "| 0/1 [" in drawn and "| 0/4 [" not in drawn.split("val 1")[0]
    assert "val 1:   0%|" in drawn and "| 0/4 [" in drawn.split("val 1")[1]
    assert "Epoch 1: val mIoU" in drawn  # the log lines stay
    status, drawn = in_a_terminal("evaluate.py", "--model_dir", str(model_dir), "--restore_file", "last", "--tta")
    assert status == 0, drawn[-3000:]
    assert "val TTA:   0%|" in drawn and "| 0/4 [" in drawn and "img/s]" in drawn
    assert "mIoU" in drawn.split("val TTA")[-1]  # the result after the bar


def test_no_bars_where_stderr_is_not_a_terminal_only_the_log_lines(experiment, capsys):
    model_dir = experiment(num_iterations=1)
    assert train.main(["--model_dir", str(model_dir)]) == 0
    err = capsys.readouterr().err
    assert BAR not in err and "Epoch 1: val mIoU" in err
    result = subprocess.run([sys.executable, "evaluate.py", "--model_dir", str(model_dir), "--restore_file", "last"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0 and BAR not in result.stderr and "mIoU" in result.stderr


def test_predict_draws_its_bar_on_a_terminal_only(tmp_path, capsys, terminal):
    write_checkpoint(tmp_path / utils.BEST_CHECKPOINT)
    for i in range(3):
        Image.fromarray(smooth_image(20 + i, 30, i)).save(tmp_path / f"{i}.png")
    arguments = ["--model_dir", str(tmp_path), str(tmp_path / "*.png"), "--out", str(tmp_path / "out")]
    assert predict.main(arguments) == 0
    assert BAR not in capsys.readouterr().err
    screen = terminal()
    assert predict.main(arguments) == 0
    assert "100%|" in screen.getvalue() and "3/3 [" in screen.getvalue()
    assert np.array(Image.open(tmp_path / "out" / "labels" / "2.png")).shape == (22, 30)
