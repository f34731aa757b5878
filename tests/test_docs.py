"""The library example of docs/losses.md runs as written, on inputs of the shapes its comments give."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

DOC = Path(__file__).resolve().parents[1] / "docs" / "losses.md"


def python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_losses_example_runs():
    example = python_blocks(DOC.read_text())[0]
    rng = np.random.default_rng(0)
    C, D, N, B, S = 21, 256, 64, 2, 16
    labels = rng.integers(0, C, N).astype(np.int32)
    logits = jnp.asarray(rng.normal(size=(N, C)) * 4, jnp.float32)
    namespace = {
        # The inputs the example leaves to its reader: features, labels and teacher probabilities at h×w.
        "feats": jnp.asarray(rng.normal(size=(N, D)), jnp.float32),
        "labels": jnp.asarray(labels),
        "probs": jax.nn.softmax(logits.at[jnp.arange(N), labels].add(20.0)),  # confident and right: all candidates
        "student_feats": jnp.asarray(rng.normal(size=(N, D)), jnp.float32),
        "student_labels": jnp.asarray(labels),
    }
    exec(compile(example, str(DOC), "exec"), namespace)
    bank, sigma = namespace["bank"], namespace["sigma"]
    assert int(bank.count.sum()) > 0  # the bank step stored rows
    assert sorted(np.asarray(sigma).tolist()) == list(range(C))  # a permutation of the anchors
    assert np.isfinite(float(namespace["l_con"])) and float(namespace["l_con"]) > 0

    teacher = [jnp.asarray(rng.normal(size=(B, S, S, C)), jnp.float32) for _ in range(4)]
    students = [jnp.asarray(rng.normal(size=(B, S, S, C)), jnp.float32) for _ in range(2)]
    mask = jnp.asarray(rng.integers(0, 2, (B, S, S)), jnp.float32)
    loss, selection = namespace["unsup_losses"](*teacher, *students, mask)
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert selection["keep"].shape == (B, S, S)
