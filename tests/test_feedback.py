"""The closed loop: the feedback channel, the confusion tracker and the planning policies."""
import multiprocessing as mp
import os
import signal
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from onlinemix.batch import SyntheticRows
from onlinemix.feedback import ClosedLoop, ConfusionTracker, FeedbackBlock
from onlinemix.plan import Planner, Request
from onlinemix.segments import SHM_DIR

LABELS = np.repeat(np.arange(4), [6, 3, 5, 2])


def read_many(block, reads, conn):
    """Reader process: every read must be one whole publication (all entries equal its number)."""
    torn, last, seen = 0, 0, set()
    for _ in range(reads):
        feedback = block.read()
        n = feedback.publication
        if not (np.all(feedback.confusion == n) and feedback.step == n and feedback.progress == n * 1e-6):
            torn += 1
        if n < last:
            torn += 1
        last = n
        seen.add(n)
    conn.send((torn, len(seen)))


def test_the_channel_round_trips_between_processes_without_torn_reads():
    with FeedbackBlock.create(12) as block:
        parent, child = mp.Pipe()
        reader = mp.get_context("spawn").Process(target=read_many, args=(block, 20000, child))
        reader.start()
        n = 0
        while not parent.poll():  # a writer that never stops until the reader is done
            n += 1
            block.publish(np.full((12, 12), float(n)), progress=n * 1e-6, step=n)
        torn, publications = parent.recv()
        reader.join(30)
    assert torn == 0 and publications > 10, f"{torn} torn reads over {publications} publications seen"


def test_a_killed_trainer_leaves_no_block_behind():
    code = ("import time\nfrom onlinemix.feedback import FeedbackBlock\n"
            "block = FeedbackBlock.create(3)\nprint(block.name, flush=True)\ntime.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    name = child.stdout.readline().strip()
    assert os.path.exists(os.path.join(SHM_DIR, name))
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    FeedbackBlock.create(3).close()  # creating a block sweeps what dead trainers left
    assert not os.path.exists(os.path.join(SHM_DIR, name))


def test_only_the_creator_publishes_and_shapes_are_checked():
    with FeedbackBlock.create(3) as block:
        assert block.read().publication == 0, "nothing published yet"
        with pytest.raises(ValueError, match="must be 3x3"):
            block.publish(np.zeros((2, 2)), progress=0, step=0)
        reader = FeedbackBlock(block.name)  # as a worker unpickles it
        with pytest.raises(ValueError, match="Only the process that created"):
            reader.publish(np.zeros((3, 3)), progress=0, step=0)
        block.publish(np.eye(3), progress=0.5, step=7)
        assert reader.read().step == 7 and np.array_equal(reader.read().confusion, np.eye(3))
        reader.close()


def test_the_tracker_counts_real_rows_and_keeps_an_ema():
    tracker = ConfusionTracker(3, decay=0.5)
    logits = torch.eye(3)[[1, 1, 2, 0]] * 5  # called 1, 1, 2, 0
    labels = torch.tensor([0, 1, 2, 0])
    synthetic = torch.tensor([3])  # the last row was swapped for a synthetic image
    tracker.update(logits, labels, synthetic)
    first = tracker.flush(tracker.pending())
    assert first.tolist() == [[0, 1, 0], [0, 1, 0], [0, 0, 1]], "each seen class's row sums to 1"
    tracker.update(torch.eye(3)[[0]] * 5, torch.tensor([0]), None)
    second = tracker.flush(tracker.pending())
    assert second[0].tolist() == [0.5, 0.5, 0.0] and second[1].tolist() == [0, 1, 0], "unseen rows keep their value"


def test_the_loop_publishes_every_n_steps_and_counts_the_pairs_trained_on():
    with FeedbackBlock.create(3) as block:
        loop = ClosedLoop(3, block, every=2, total_steps=10, gather=lambda value: [value])
        rows = SyntheticRows(torch.tensor([0]), torch.tensor([2]), torch.tensor([1]), torch.tensor([0.5]))
        loop.step(0, torch.eye(3)[[1, 1]], torch.tensor([0, 0]), rows)
        assert block.read().publication == 0
        loop.step(1, torch.eye(3)[[1, 1]], torch.tensor([0, 0]), None)
        feedback = block.read()
        assert feedback.publication == 1 and feedback.progress == 0.2 and feedback.confusion[0, 1] == 1.0
        state = loop.epoch_state()
        assert state["pairs"][1, 2] == 1 and state["top_pairs"] == [[1, 2, 1]]
        assert state["top_confusions"][0][:2] == [0, 1] and state["pairs_on_confusions"] == 0.0
        assert loop.epoch_state()["pairs"].sum() == 0, "pair counts restart each epoch"


def test_uniform_reproduces_the_papers_request_stream_exactly():
    """Pinned from the planner before the closed loop existed (commit 589d46d)."""
    expected = [(9, 2, 0, 0.9, 1072191044), (2, 0, 0, 0.7, 1042610374), (8, 1, 3, 0.7, 151227035),
                (9, 2, 3, 0.5, 2103343575), (7, 1, 1, 0.5, 1098201708), (2, 0, 1, 0.7, 1837640958)]
    planner = Planner(LABELS, "diffmix", seed=11, policy="uniform")
    planner.update(np.full((4, 4), 0.25), 0.5)  # uniform ignores the feedback
    assert planner.take(6) == [Request(*r) for r in expected]
    expected = [(7, 1, 1, 0.9, 1072191044), (0, 0, 0, 0.7, 1042610374), (15, 3, 3, 0.7, 151227035),
                (15, 3, 3, 0.5, 2103343575)]
    assert Planner(LABELS, "diffaug", seed=11, target_weights=[1, 2, 3, 4]).take(4) == [Request(*r) for r in expected]


def confusion_matrix():
    matrix = np.diag([0.5, 0.8, 0.5, 1.0])
    matrix[0, 1], matrix[1, 0], matrix[2, 3] = 0.5, 0.2, 0.5
    return matrix


def test_confusion_pairs_follow_the_matrix_and_the_floor_within_sampling_error():
    floor, draws = 0.3, 40000
    planner = Planner(LABELS, "diffmix", seed=2, policy="confusion", floor=floor)
    planner.update(confusion_matrix(), 0.0)
    requests = planner.take(draws)
    counts = Counter((r.target, r.source) for r in requests)
    off = confusion_matrix() * (1 - np.eye(4))
    expected = floor * np.outer(np.full(4, 0.25), np.bincount(LABELS) / len(LABELS)) + (1 - floor) * off / off.sum()
    for t in range(4):
        for s in range(4):
            p = expected[t, s]
            assert abs(counts[t, s] / draws - p) < 4 * np.sqrt(p * (1 - p) / draws) + 1e-9, (t, s)
    assert all(LABELS[r.reference] == r.source for r in requests), "the reference is an image of the source class"


def test_hard_class_targets_follow_the_error_and_schedules_follow_progress():
    planner = Planner(LABELS, "diffaug", seed=3, policy="hard-class", floor=0.0, strength_schedule=(0.9, 0.5))
    planner.update(confusion_matrix(), 0.0)
    targets = Counter(r.target for r in planner.take(20000))
    error = np.array([0.5, 0.2, 0.5, 0.0])
    for t in range(4):
        assert abs(targets[t] / 20000 - error[t] / error.sum()) < 0.015
    assert {r.strength for r in planner.take(50)} == {0.9}
    planner.update(confusion_matrix(), 0.5)
    assert {r.strength for r in planner.take(50)} == {0.7}
    assert planner.scheduled_strengths()[[0, -1]].tolist() == [0.5, 0.9]


def test_the_policy_follows_a_new_publication_at_once():
    """Through a worker's producer: the next batch after a publication follows it."""
    from onlinemix.generator.worker import DiffusionProducer, DiffusionProducerFactory, GeneratorSpec
    from tests.helpers import TensorImages

    references = TensorImages(torch.zeros(16, 3, 8, 8, dtype=torch.uint8), LABELS.tolist())
    with FeedbackBlock.create(4) as block:
        spec = GeneratorSpec(model="unused", strategy="realmix", policy="confusion", policy_floor=0.0, resolution=32)
        factory = DiffusionProducerFactory(spec, references, list("abcd"), "bird", feedback=block)
        producer = DiffusionProducer(factory, None, factory.planner.reseeded(0), None, None)
        block.publish(confusion_matrix(), progress=0.1, step=1)
        producer.follow_feedback()
        assert {(r.target, r.source) for r in producer.planner.take(200)} == {(0, 1), (1, 0), (2, 3)}
        moved = np.eye(4) * 0.5
        moved[3, 2] = moved[0, 3] = moved[1, 2] = moved[2, 0] = 0.5
        block.publish(moved, progress=0.2, step=2)
        producer.follow_feedback()
        assert {(r.target, r.source) for r in producer.planner.take(200)} == {(3, 2), (0, 3), (1, 2), (2, 0)}


@pytest.mark.parametrize("kwargs, message", [
    (dict(policy="confused"), "Unknown planning policy 'confused'"),
    (dict(floor=1.5), r"must lie in \[0, 1\]"),
    (dict(strength_schedule=(0.9, 0.0)), r"both in \(0, 1\]"),
    (dict(strength_schedule=(1.2, 0.5)), r"both in \(0, 1\]"),
])
def test_bad_policies_stop_with_a_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Planner(LABELS, "diffmix", **kwargs)


def test_confusion_needs_an_inter_class_strategy_and_a_feedback_block():
    from onlinemix.generator.worker import DiffusionProducerFactory, GeneratorSpec
    from tests.helpers import TensorImages

    with pytest.raises(ValueError, match="use hard-class or uniform"):
        Planner(LABELS, "diffaug", policy="confusion")
    references = TensorImages(torch.zeros(16, 3, 8, 8, dtype=torch.uint8), LABELS.tolist())
    spec = GeneratorSpec(model="unused", strategy="realmix", policy="hard-class", resolution=32)
    with pytest.raises(ValueError, match="pass feedback="):
        DiffusionProducerFactory(spec, references, list("abcd"), "bird")


def test_a_sweep_spares_live_segments_of_every_kind():
    """A ring's sweep must not take a live feedback block for a half-created segment, nor the reverse."""
    import time

    from onlinemix import SampleRing

    def age(name):  # older than the minute a segment without a known header is given
        past = time.time() - 120
        os.utime(os.path.join(SHM_DIR, name), (past, past))

    with FeedbackBlock.create(3) as block:
        age(block.name)
        with SampleRing.create(4, 8, producers=1, consumers=1) as ring:
            assert os.path.exists(os.path.join(SHM_DIR, block.name)), "the ring's sweep removed a live block"
            age(ring.name)
            FeedbackBlock.create(3).close()
            assert os.path.exists(os.path.join(SHM_DIR, ring.name)), "the block's sweep removed a live ring"
