"""A throwaway Orthanc with its DICOMweb plugin for the tests (issue 30): Debian's orthanc and
orthanc-dicomweb started on 127.0.0.1 with every file in one folder and a user and password,
stopped by its process id. ``start`` returns the server or the reason it cannot run here.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from base64 import b64encode
from dataclasses import dataclass
from pathlib import Path

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "thumbclf", "s3cret-not-shown"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Orthanc:
    folder: Path
    port: int
    proc: subprocess.Popen

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.root}/dicom-web"

    def _request(self, path: str, data: bytes | None = None) -> bytes:
        req = urllib.request.Request(self.root + path, data=data, method="POST" if data else "GET")
        token = b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read()

    def upload(self, files) -> None:
        for f in files:
            self._request("/instances", Path(f).read_bytes())

    def log(self) -> str:
        """The server's log, each line once (Orthanc.log is a link to the newest file)."""
        return "\n".join(p.read_text(errors="replace") for p in
                         sorted(self.folder.glob("logs/*.log*")) if not p.is_symlink())

    def stop(self) -> None:
        """Killed: a throwaway server whose database folder goes with the test's (a polite
        SIGTERM took Orthanc 2.3 s of shutdown, the test's core idle meanwhile)."""
        self.proc.kill()
        self.proc.wait()


def start(folder: Path) -> tuple[Orthanc | None, str]:
    exe = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    if not Path(exe).exists() or not PLUGIN.exists():
        return None, ("Orthanc or its DICOMweb plugin is not installed; apt-get install orthanc "
                      "orthanc-dicomweb (make test does, as root)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "logs").mkdir(exist_ok=True)
    port = _free_port()
    config = {"Name": "thumbclf-test", "StorageDirectory": str(folder / "db"),
              "IndexDirectory": str(folder / "db"), "HttpPort": port, "DicomServerEnabled": False,
              "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
              "RegisteredUsers": {USER: PASSWORD}, "Plugins": [str(PLUGIN)],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (folder / "orthanc.json").write_text(json.dumps(config))
    proc = subprocess.Popen([exe, "--verbose", f"--logdir={folder / 'logs'}",
                             str(folder / "orthanc.json")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = Orthanc(folder, port, proc)
    for _ in range(300):
        if proc.poll() is not None:
            break
        try:
            server._request("/system")
            return server, ""
        except OSError:
            time.sleep(0.1)
    why = server.log()[-1500:]
    server.stop()
    return None, f"Orthanc did not come up: {why}"
