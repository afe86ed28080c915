"""Models logged by cxrexp 0.1.0 (before the re-layering) still load and predict identically.

The fixture (tests/fixtures/README.md) is a raw-image model as 0.1.0 logged it: its
``raw_image_model.py`` imports ``cxrexp.serving.RawImageClassifier``. Two ways it is loaded:

- in a process that already imported this cxrexp (``cxrexp evaluate``, ``cxrexp predict``), where
  Python resolves ``cxrexp.serving`` inside the installed package: the shim ``cxrexp/serving.py``;
- in a fresh process (``mlflow models serve``), where the model's own ``code/cxrexp`` copy is used.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "legacy_model_0.1.0.tar.gz"


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    root = tmp_path_factory.mktemp("legacy")
    with tarfile.open(FIXTURE) as archive:
        archive.extractall(root, filter="data")
    expected = json.loads((root / "expected.json").read_text())
    images = [(root / f"input_{i}.png").read_bytes() for i in range(len(expected["probability"]))]
    return root / "legacy_model", images, expected


def test_the_fixture_is_a_model_of_the_old_layout(legacy):
    model_dir, _, _ = legacy
    assert "from cxrexp.serving import RawImageClassifier" in (model_dir / "raw_image_model.py").read_text()
    assert (model_dir / "code" / "cxrexp" / "preprocess.py").exists()  # 0.1.0's flat modules
    assert not (model_dir / "code" / "cxrexp" / "images").exists()


def test_loads_and_predicts_identically_in_a_process_with_this_cxrexp(legacy):
    import cxrexp
    from cxrexp.mlflow_edge.serving import load_pyfunc

    model_dir, images, expected = legacy
    path_before = list(sys.path)
    model = load_pyfunc(str(model_dir))
    # The old code copy is not left on sys.path, where worker processes started later would import it.
    assert sys.path == path_before
    assert type(model.unwrap_python_model()).__module__ == "cxrexp.mlflow_edge.serving"  # via the shim
    out = model.predict(pd.DataFrame({"image": [base64.b64encode(b).decode("ascii") for b in images]}))
    np.testing.assert_allclose(out["probability"].to_numpy(), expected["probability"], rtol=0, atol=1e-6)
    assert out["label"].tolist() == expected["label"]
    # This package's modules are still the ones in use.
    from cxrexp.images import decode

    assert Path(decode.__file__).parent.parent == Path(cxrexp.__file__).parent


def test_keras_model_and_spec_load_for_evaluation(legacy):
    from cxrexp.data.tfdata import predict_probabilities
    from cxrexp.images.decode import decode_grey
    from cxrexp.images.transforms import prepare
    from cxrexp.mlflow_edge.serving import load_keras_model

    model_dir, images, expected = legacy
    keras_model, spec, threshold = load_keras_model(str(model_dir))
    assert spec.image_size == 32 and threshold == 0.5
    prepared = np.stack([prepare(decode_grey(b), spec) for b in images])
    probabilities = predict_probabilities(keras_model, prepared, np.arange(len(images)), 8)
    np.testing.assert_allclose(probabilities, expected["probability"], rtol=0, atol=1e-6)


def test_loads_and_predicts_identically_in_a_fresh_process(legacy, tmp_path):
    model_dir, images, expected = legacy
    for i, data in enumerate(images):
        (tmp_path / f"{i}.png").write_bytes(data)
    script = textwrap.dedent(
        f"""
        import json, sys
        from pathlib import Path
        import mlflow, pandas as pd
        model = mlflow.pyfunc.load_model({str(model_dir)!r})
        frame = pd.DataFrame({{"image": [Path(f"{{i}}.png").read_bytes() for i in range({len(images)})]}})
        out = model.predict(frame)
        import cxrexp.serving
        print(json.dumps({{"module": cxrexp.serving.__file__, "probability": out["probability"].tolist(),
                           "label": out["label"].tolist()}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(result["probability"], expected["probability"], rtol=0, atol=1e-6)
    assert result["label"] == expected["label"]
