"""The README's Python example runs as written (on the built-in MNIST)."""
import re
from pathlib import Path

import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"## Python API.*?```python\n(.*?)```", text, re.S).group(1)
    assert len([line for line in code.splitlines() if line.strip() and not line.startswith("#")]) <= 10
    monkeypatch.chdir(tmp_path)
    env: dict = {}
    exec(compile(code, "README.md", "exec"), env)
    result, net = env["result"], env["net"]
    # an untrained MLP retrained briefly (2 x 0.5 epoch of the 50k training split; chance is 0.9)
    assert result.error_after is not None and result.error_after < 0.2
    assert {type(m).__name__ for m in net.layers().values()} == {"MaskedLinear"}
    out = capsys.readouterr().out
    assert "non-zero" in out and "error:" in out
    for name in ("mlp.onnx", "mlp-fast.onnx"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    ort.InferenceSession(str(tmp_path / "out" / "mlp.onnx"))
