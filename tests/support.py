"""Shared test helpers: where things are, the node script as a module, a throwaway TLS cert."""

import datetime
import os
import shutil
import subprocess

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
BOOTSTRAP_PY = os.path.join(REPO_ROOT, "bootstrap", "bootstrap.py")
FIXTURE_SYSTEMS = os.path.join(TESTS_DIR, "fixtures", "systems")


# the one import of the node script in the tests (the hub imports the same module)
from bootstrap import bootstrap  # noqa: E402


def vagrant_validate(directory, dotfile):
    """`vagrant validate --ignore-provider` of the Vagrantfile in directory (offline)."""
    vagrant = shutil.which("vagrant")
    assert vagrant, "vagrant is not installed (tests/setup-env installs it)"
    env = dict(os.environ, VAGRANT_DOTFILE_PATH=str(dotfile), VAGRANT_CHECKPOINT_DISABLE="1")
    return subprocess.run([vagrant, "validate", "--ignore-provider"], cwd=str(directory),
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=120)


def make_self_signed_cert(directory):
    """(cert path, key path) of a fresh self-signed EC certificate for 127.0.0.1."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path = os.path.join(str(directory), "cert.pem")
    key_path = os.path.join(str(directory), "key.pem")
    with open(cert_path, "wb") as handle:
        handle.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    import pathlib
    return pathlib.Path(cert_path), pathlib.Path(key_path)
