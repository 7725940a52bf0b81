"""What only a process of its own shows: a fresh home folder, a hang-up, Ctrl-C, the console of
a quiet run. Each test starts thumbclf as a user would."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import ROOT, model_file, run_script, write_yaml
from thumbclf.inputs import synth

CLASSES = ("Biopsy", "IHC", "TMA")


@pytest.mark.slow
def test_a_run_with_a_fresh_home_writes_nothing_outside_its_folders(tiny_data, tmp_path):
    """Issue 24, item 4: nothing written outside the results and cache folders."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    engine = "engine: openvino\nprecision: fp32\n"
    try:
        import openvino  # noqa: F401
    except ImportError:
        engine = ""  # the telemetry part needs the optional extra
    (work / "t.yaml").write_text(f"thumbData: {tiny_data}\ntrainFull: true\npretrained: false\n"
                                 "max_epochs: 1\nbootstrap: 0\ngradcam: 0\nnum_workers: 0\n")
    (work / "d.yaml").write_text(f"thumbData: {tiny_data}\nmodelAdr: t\nbootstrap: 0\ngradcam: 0\n"
                                 f"num_workers: 0\n{engine}")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("XDG_", "MPLCONFIGDIR", "TORCH_HOME", "CI"))}
    env.update(HOME=str(home), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    code = ("import sys; from thumbclf.cli import main; "
            "sys.exit(main('train', ['t.yaml', '--quiet']) or main('deploy', ['d.yaml', '--quiet']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert sorted(p.relative_to(home).as_posix() for p in home.rglob("*")) == []
    assert sorted(p.name for p in work.iterdir()) == ["d", "d.yaml", "t", "t.yaml", "thumbclf-cache"]


@pytest.mark.slow
def test_a_quiet_int8_deploy_prints_no_progress_bar(tmp_path):
    """Issue 24, hostile inputs."""
    pytest.importorskip("nncf", reason="int8 needs the optional extra thumbclf[openvino]")
    from conftest import run_script

    from thumbclf.inputs import synth

    data = synth.generate(tmp_path / "data", per_class=50, seed=3, sides=(40, 70),
                          classes=CLASSES)  # 150: enough images for the gate's bound (149)
    model = model_file(tmp_path / "model.pt")
    exp = tmp_path / "q.yaml"
    exp.write_text(f"thumbData: {data}\nmodelAdr: {model}\nbootstrap: 0\ngradcam: 0\n"
                   f"num_workers: 0\nengine: openvino\nprecision: int8\n"
                   f"cache_dir: {tmp_path / 'cache'}\n")
    r = run_script("deploy_thumbclassifier.py", str(exp), "--quiet", process=True)
    assert r.returncode == 0, r.stderr
    assert "openvino int8 (verified" in (tmp_path / "q" / "run.log").read_text()
    console = r.stdout + r.stderr
    for bar in ("Statistics collection", "Bias correction", "\u2501", "100%", "nncf"):
        assert bar not in console, console
    assert r.stdout == ""


@pytest.mark.slow
def test_a_hangup_ends_like_ctrl_c(tiny_data, tmp_path):
    """Issue 24, hostile inputs."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    exp = tmp_path / "t.yaml"
    exp.write_text(f"thumbData: {tiny_data}\ntrainFull: true\npretrained: false\nmax_epochs: 20\n"
                   "stopEpoch: 20\nbootstrap: 0\ngradcam: 0\nnum_workers: 0\n")
    proc = subprocess.Popen([sys.executable, "-m", "thumbclf", "train", str(exp)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    deadline = time.time() + 300
    while not (tmp_path / "t" / "full" / "checkpoint.pt").is_file() and time.time() < deadline:
        time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGHUP)  # the terminal closed
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "continue with the same command plus --resume" in err, err


@pytest.mark.slow
def test_interrupted_deploy_resumes_with_only_the_rest(model_dir, tmp_path):
    """Issue 5, messy archives."""
    synth.generate(tmp_path / "many", per_class=60, seed=9, sides=(60, 120),
                   classes=("IHC", "TMA"))
    exp = write_yaml(tmp_path / "d.yaml", f"thumbData: {tmp_path / 'many'}\nmodelAdr: {model_dir}\n"
                     "hasLabels: false\nbatch_size: 1\nnum_workers: 0\n")
    partial = tmp_path / "d" / "predictions.partial.csv"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # Ctrl-C as a terminal sends it: a suite started in the background (nohup, `&`) ignores
    # SIGINT, and its children would inherit that and run to the end
    proc = subprocess.Popen([sys.executable, str(ROOT / "deploy_thumbclassifier.py"), str(exp)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline:
        if partial.is_file() and len(partial.read_text().splitlines()) > 5:
            break
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "--resume" in err
    done = len(pd.read_csv(partial))
    assert 4 < done < 120
    r = run_script("deploy_thumbclassifier.py", str(exp), "--resume")
    assert r.returncode == 0, r.stderr
    assert f"resuming: {done} images predicted earlier, {120 - done} to go" in r.stderr
    pred = pd.read_csv(tmp_path / "d" / "predictions.csv")
    assert len(pred) == 120 and pred["PATH"].is_unique and not partial.exists()
    r = run_script("deploy_thumbclassifier.py", str(exp), "--resume")
    assert r.returncode == 2 and "finished already" in r.stderr
