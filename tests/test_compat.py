"""The torchvision trap (CUDA wheel beside CPU torch) is handled once, at `import mergeflow`."""

import subprocess
import sys


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
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() in {"stubbed", "native"}


def test_without_the_fix_torchvision_fails_here_when_its_extension_cannot_load():
    """Shows the trap is real on this build: only then does mergeflow declare the schemas."""
    code = (
        "import torch, importlib.util, pathlib\n"
        "spec = importlib.util.find_spec('torchvision')\n"
        "so = sorted(pathlib.Path(spec.origin).parent.glob('_C*.so'))\n"
        "try:\n"
        "    torch.ops.load_library(str(so[0])); print('native')\n"
        "except OSError:\n"
        "    try:\n"
        "        import torchvision; print('imported')\n"
        "    except RuntimeError as e:\n"
        "        print('trap' if 'torchvision::' in str(e) else 'other')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() in {"native", "trap"}, out.stdout + out.stderr[-2000:]
