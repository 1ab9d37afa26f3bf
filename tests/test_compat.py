"""The torchvision trap (the PyPI torchvision wheel, a CUDA build, beside the CPU torch) is handled once, at
`import mergeflow`. The locked environment (requirements.lock) has the trap, so the outcome is fixed: torchvision
fails to import on its own, and imports with its detection ops stubbed after `import mergeflow`. If a future lock
pairs a torchvision whose extension loads, these tests fail on purpose: then `mergeflow/compat.py` can go."""

import subprocess
import sys

_LOAD_EXTENSION = (
    "import torch, importlib.util, pathlib\n"
    "spec = importlib.util.find_spec('torchvision')\n"
    "so = sorted(pathlib.Path(spec.origin).parent.glob('_C*.so'))\n"
    "try:\n"
    "    torch.ops.load_library(str(so[0])); print('native')\n"
    "except OSError:\n"
    "    print('broken')\n"
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_the_locked_torchvision_extension_cannot_load_beside_cpu_torch():
    out = _run(_LOAD_EXTENSION)
    assert out.stdout.strip() == "broken", (
        "torchvision's extension loads here: the trap is gone, so mergeflow/compat.py's stubs are no longer needed "
        f"({out.stdout}{out.stderr[-500:]})")


def test_without_the_fix_torchvision_fails_to_import():
    out = _run("try:\n    import torchvision; print('imported')\nexcept RuntimeError as e:\n"
               "    print('trap' if 'torchvision::' in str(e) else 'other: ' + str(e))\n")
    assert out.stdout.strip() == "trap", out.stdout + out.stderr[-2000:]


def test_torchvision_transformers_and_open_clip_import_after_mergeflow():
    code = (
        "import mergeflow, mergeflow.compat as c\n"
        "import torch, torchvision\n"
        "from torchvision import transforms\n"
        "import transformers, open_clip\n"
        "x = transforms.Normalize([0.5], [0.5])(torch.ones(1, 2, 2))\n"
        "assert torch.allclose(x, torch.ones(1, 2, 2))\n"
        "print('stubbed' if c.torchvision_ops_stubbed else 'native')\n"
    )
    out = _run(code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "stubbed", out.stdout
