"""The checks before the heavy imports: common mistakes are reported without torch or MONAI being imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from himatch_med import preflight
from himatch_med.config import Settings
from himatch_med.errors import InputError, WeightsUnavailableError

ROOT = Path(__file__).resolve().parents[1]


def fake_bank(folder: Path, **settings) -> Path:
    folder.mkdir(parents=True)
    (folder / "bank.json").write_text(json.dumps({"format_version": 2, "settings": settings}))
    (folder / "bank.safetensors").write_bytes(b"")  # there; what it holds is checked when the bank is opened
    return folder


def test_missing_paths_are_named(tmp_path):
    (tmp_path / "here.nii.gz").write_bytes(b"")
    preflight.existing([tmp_path / "here.nii.gz", tmp_path])
    with pytest.raises(InputError, match="gone.nii.gz: no such file or folder"):
        preflight.existing([tmp_path / "here.nii.gz", tmp_path / "gone.nii.gz"])


def test_an_output_folder_under_a_file_is_refused_and_a_new_one_is_not(tmp_path):
    preflight.writable(tmp_path / "new" / "deeper")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="cannot be written.*-o"):
        preflight.writable(tmp_path / "file" / "out")


def test_a_folder_that_refuses_files_is_found_before_the_heavy_imports_even_for_root(tmp_path):
    # /proc grants root every permission bit but takes no new file: only the probe can tell.
    with pytest.raises(InputError, match="/proc/out: the output folder cannot be written.*-o"):
        preflight.writable(Path("/proc/out"))
    preflight.writable(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing behind


def test_a_model_path_that_is_not_a_folder_is_refused(tmp_path):
    preflight.model_folder("facebook/dinov2-base")
    preflight.model_folder(str(tmp_path))
    with pytest.raises(InputError, match="no such folder"):
        preflight.model_folder(str(tmp_path / "weights"))


def hub_cache(folder: Path, repo: str) -> Path:
    """A Hugging Face cache holding ``repo``'s config.json, laid out as huggingface_hub lays it out."""
    repo_folder = folder / f"models--{repo.replace('/', '--')}"
    (repo_folder / "snapshots" / "abc123").mkdir(parents=True)
    (repo_folder / "snapshots" / "abc123" / "config.json").write_text("{}")
    (repo_folder / "refs").mkdir()
    (repo_folder / "refs" / "main").write_text("abc123")
    return folder


def test_a_hub_id_out_of_reach_is_refused_unless_cached_or_reachable(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from himatch_med import hub

    repo = "facebook/dinov3-vitb16-pretrain-lvd1689m"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match=r"not in this machine's Hugging Face cache \(.*empty\).*HF_HUB_OFFLINE"
                                                      r".*--model /path/to/folder(.|\n)*accept the licence"):
        preflight.model_available(repo)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub, "unreachable", lambda timeout=3.0: "huggingface.co: Name or service not known")
    with pytest.raises(WeightsUnavailableError, match="cannot be reached \\(huggingface.co: Name or service"):
        preflight.model_available(repo)
    preflight.model_available(str(tmp_path))  # a folder is the backbone's to read
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache(tmp_path / "cache", repo)))
    preflight.model_available(repo)  # cached: transformers finds it offline
    with pytest.raises(WeightsUnavailableError):
        preflight.model_available("facebook/dinov3-vits16-pretrain-lvd1689m")  # another id is not
    monkeypatch.setattr(hub, "unreachable", lambda timeout=3.0: None)
    preflight.model_available("facebook/dinov3-vits16-pretrain-lvd1689m")  # the Hub will be asked
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "unreachable", lambda timeout=3.0: "huggingface.co: Name or service not known")
    (tmp_path / "mymodel").mkdir()
    preflight.model_available("mymodel")  # a folder named without ./ is a folder too, as transformers reads it
    with pytest.raises(WeightsUnavailableError, match="--model nomodel: not in"):
        preflight.model_available("nomodel")


@pytest.fixture
def probing(monkeypatch):
    """No offline mode, no proxy, and the probe's memory of earlier answers cleared (before and after)."""
    from himatch_med import hub

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "http_proxy", "https_proxy", "all_proxy",
                 "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    hub.probe.cache_clear()
    yield hub
    hub.probe.cache_clear()


def test_the_hub_is_probed_once_at_its_endpoints_port_and_a_proxy_counts_as_reachable(probing, monkeypatch):
    import socket

    hub, calls = probing, []

    def refused(address, timeout=None):
        calls.append(address)
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refused)
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example")
    assert hub.unreachable() == "mirror.example: Connection refused"
    assert hub.unreachable() == "mirror.example: Connection refused"
    assert calls == [("mirror.example", 80)]  # http's port, and asked once for the checks and the loading
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example:8443")
    assert hub.unreachable() is not None and calls[-1] == ("mirror.example", 8443)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    assert hub.unreachable() is None  # the proxy may reach it: huggingface_hub finds out
    monkeypatch.setenv("NO_PROXY", "mirror.example")
    assert hub.unreachable() is not None  # not for a host the proxy is bypassed for
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert hub.offline() and hub.unreachable() is None


def test_a_hub_that_never_answers_is_given_up_after_the_timeout_name_lookup_included(probing, monkeypatch):
    import socket
    import time

    hub = probing
    def stalled(address, timeout=None):  # a name lookup that a dropping resolver stretches past the timeout
        time.sleep(3)
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", stalled)
    started = time.perf_counter()
    assert hub.probe("stalled.example", 443, 0.3) == "stalled.example: no answer in 0.3 s"
    assert time.perf_counter() - started < 2


def test_the_quick_start_without_weights_and_network_answers_before_the_heavy_imports(tmp_path):
    """The README's first line on a machine that has neither the weights nor the Hub: the real cause, at once."""
    # A closed local port (discard, 9) stands for the Hub out of reach on any machine, whatever its resolver.
    env = {name: value for name, value in os.environ.items() if "proxy" not in name.lower()
           and name not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_CACHE=str(tmp_path / "cache"), HF_ENDPOINT="http://127.0.0.1:9")
    code = ("import sys, time\nfrom himatch_med.run import main\nstarted = time.perf_counter()\n"
            f"rc = main(['sample_data/query.nii.gz', '--references', 'sample_data/references', '--image-size', '224',"
            f" '-o', {str(tmp_path / 'results')!r}])\n"
            "print(sorted(m for m in ('torch', 'monai', 'transformers', 'nibabel') if m in sys.modules))\n"
            "sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8",
                          errors="replace", timeout=120, env=env, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert "cannot be reached (127.0.0.1: Connection refused" in done.stderr and "accept the licence" in done.stderr, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert not (tmp_path / "results").exists() and "Traceback" not in done.stderr


def test_a_bank_built_with_other_settings_is_refused_before_it_is_opened(tmp_path):
    settings = Settings(model="m", image_size=64).resolved()
    fitting = fake_bank(tmp_path / "fits", **{**settings.bank_fields(), "model": "other", "stages": [1]})
    preflight.bank_fits(fitting, settings)  # model and stages are checked when the bank is opened
    other = fake_bank(tmp_path / "other", **{**settings.bank_fields(), "image_size": 32})
    with pytest.raises(InputError, match="image_size: bank has 32, this run asks for 64"):
        preflight.bank_fits(other, settings)
    with pytest.raises(InputError, match="not a complete bank"):
        preflight.bank_fits(tmp_path / "nothing", settings)
    (other / "bank.safetensors").unlink()  # a copy cut short: its description without its arrays
    with pytest.raises(InputError, match=r"other: not a complete bank \(missing bank.safetensors\)"):
        preflight.bank_fits(other, settings)


COMMANDS = {
    "run": "from himatch_med.run import main",
    "bank": "from himatch_med.bank.__main__ import bank_main as main",
    "screen": f"sys.path.insert(0, {str(ROOT / 'pipelines')!r}); from screen import main",
    "evaluate": f"sys.path.insert(0, {str(ROOT / 'pipelines')!r}); from evaluate import main",
}


def answer(command: str, argv: list[str]) -> tuple[int, str, set[str]]:
    """Exit code, stderr and which heavy modules were imported by the time the command gave up."""
    code = (f"import sys\n{COMMANDS[command]}\nrc = main({argv!r})\n"
            "print(sorted(m for m in ('torch', 'monai', 'transformers', 'nibabel') if m in sys.modules))\n"
            "sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    return done.returncode, done.stderr, set(eval(done.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("command", ["run", "bank", "screen", "evaluate"])
def test_common_mistakes_are_reported_before_torch_is_imported(tmp_path, command):
    missing = str(tmp_path / "missing.nii.gz")
    (tmp_path / "file").write_text("x")
    unwritable = str(tmp_path / "file" / "out")
    bank = fake_bank(tmp_path / "bank", image_size=32, modality="mri")
    there = tmp_path / "there.nii.gz"
    there.write_bytes(b"")
    cases = {
        "run": [([missing, "--bank", str(bank), "-o", str(tmp_path / "o")], "missing.nii.gz: no such file"),
                ([str(there), "--bank", str(bank), "-o", unwritable], "cannot be written"),
                # The bank defines the run: only an explicit setting can differ from it.
                ([str(there), "--bank", str(bank), "--image-size", "64", "-o", str(tmp_path / "o")],
                 "image_size: bank has 32"),
                ([str(there), "--references", missing, "-o", str(tmp_path / "o")], "no such file"),
                ([str(there), "--bank", str(bank), "--model", str(tmp_path / "w"), "-o", str(tmp_path / "o")],
                 "no such folder")],
        "bank": [(["build", missing, "-o", str(tmp_path / "b")], "no such file"),
                 (["build", str(there), "-o", unwritable + "/bank"], "cannot be written")],
        "screen": [([missing, "--bank", str(bank), "-o", str(tmp_path / "s")], "no such file"),
                   ([str(there), "--bank", str(bank), "--image-size", "64", "-o", str(tmp_path / "s")],
                    "image_size: bank has 32")],
        "evaluate": [(["bmad", missing, "-o", str(tmp_path / "e")], "not a folder"),
                     (["bmad", str(tmp_path), "-o", unwritable], "cannot be written")],
    }
    for argv, message in cases[command]:
        code, stderr, heavy = answer(command, argv)
        assert code == 2 and message in stderr, (argv, stderr)
        assert not heavy & {"torch", "monai", "transformers"}, (argv, heavy)


def test_the_bank_file_names_are_those_io_writes():
    from himatch_med import io

    assert (preflight.BANK_META, preflight.BANK_ARRAYS) == (io.BANK_META, io.BANK_ARRAYS)
