import subprocess
import time

from engine.processes import computed_ahead


def test_computed_ahead_keeps_the_order():
    assert list(computed_ahead(abs, [-i for i in range(50)], workers=2, ahead=3)) == list(range(50))


def test_computed_ahead_cancels_what_nobody_collects(tmp_path):
    """Stopped after one result, the pool runs the items already started or queued to its
    workers, and none of the rest that were submitted ahead."""
    commands = [["sh", "-c", f"touch {tmp_path}/{i}; sleep 0.3"] for i in range(12)]
    results = computed_ahead(subprocess.call, commands, workers=2, ahead=11)
    assert next(results) == 0  # 11 submitted by now
    results.close()
    time.sleep(2)  # what was started has finished
    assert 1 < len(list(tmp_path.iterdir())) < 8
