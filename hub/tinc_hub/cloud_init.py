"""Cloud-init user data that joins a machine at first boot (`token create --cloud-init`).

The template is `user-data.yaml.in` next to this module. The token
goes into a 0600 file under /run (never into runcmd text), in a directory that `bootcmd` makes
0700 first (bootcmd runs before write_files, and cloud-init writes a file with the default
umask and chmods it only afterwards); bootstrap.py is fetched from the
hub with the pinned curl, or embedded gzip+base64 with `embed=True` (about 21 KB: over
EC2's 16 KiB limit, fine where user data may be larger).
"""

import base64
import gzip
import json
import re
import string
from importlib import resources
from typing import Dict, List, Tuple

from bootstrap import script_source

from .errors import HubError
from .state import HubConfig
from .tokens import TOKEN_TEXT_RE, bootstrap_url, check_printable

EC2_USER_DATA_LIMIT = 16 * 1024
NODE_SCRIPT_PATH = "/usr/local/sbin/tinc-bootstrap"  # where the user data puts bootstrap.py
FIRST_BOOT_TIMEOUT = 900  # seconds bootstrap.py keeps retrying the hub and waiting for the VPN
EXPIRES_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")

# What each image family may lack before the bootstrap can run. Ubuntu and Debian cloud
# images run cloud-init on python3 and ship curl: installing nothing there also keeps the
# first boot free of `apt-get update`. CentOS 7's cloud-init runs on python 2.
PACKAGES: Dict[str, List[str]] = {
    "ubuntu": [],
    "debian": [],
    "centos": ["python3", "curl"],
}


def _template() -> string.Template:
    text = resources.files(__package__).joinpath("user-data.yaml.in").read_text("utf-8")
    return string.Template(text)


def render_user_data(config: HubConfig, pin: str, token: str, expires_at: str,
                     os_name: str = "ubuntu", embed: bool = False) -> str:
    """The complete #cloud-config text for one token.

    Every value is checked first: the comments get only names, URLs and dates of known
    character sets (no line breaks), and every value is a JSON string (a YAML-safe scalar).
    """
    if os_name not in PACKAGES:
        raise HubError(f"unknown os {os_name!r}", f"use one of {', '.join(PACKAGES)}")
    check_printable(config, pin)
    if not TOKEN_TEXT_RE.fullmatch(token) or not EXPIRES_RE.fullmatch(expires_at):
        raise HubError("the token or its expiry cannot be written into user data",
                       "this is a bug: report it")
    url = bootstrap_url(config.address, config.api_port)
    if embed:
        payload = base64.b64encode(gzip.compress(script_source(), 9, mtime=0)).decode()
        bootstrap_file = (f"  - path: {NODE_SCRIPT_PATH}\n    owner: root:root\n"
                          f"    permissions: '0755'\n    encoding: gz+b64\n"
                          f"    content: {payload}\n")
        fetch = ""
    else:
        bootstrap_file = ""
        fetch = "  - " + json.dumps([
            "curl", "-fsS", "--retry", "60", "--retry-delay", "5", "--retry-connrefused",
            "--connect-timeout", "10", "--pinnedpubkey", pin, "-k", "-o", NODE_SCRIPT_PATH,
            url]) + "\n"
    return _template().substitute(
        net=config.net, hub=config.name, api_url=url, os=os_name, expires_at=expires_at,
        packages=(f"packages: {json.dumps(PACKAGES[os_name])}\n" if PACKAGES[os_name] else ""),
        token=json.dumps(token),
        bootstrap_file=bootstrap_file, fetch=fetch, timeout=FIRST_BOOT_TIMEOUT)


def size_note(user_data: str) -> Tuple[int, str]:
    """(size in bytes, one line for the admin about provider limits)."""
    size = len(user_data.encode("utf-8"))
    if size <= EC2_USER_DATA_LIMIT:
        return size, f"user data: {size} bytes (EC2 allows {EC2_USER_DATA_LIMIT})"
    return size, (f"user data: {size} bytes: over EC2's {EC2_USER_DATA_LIMIT}-byte limit "
                  "(drop --embed to fetch bootstrap.py from the hub instead)")
