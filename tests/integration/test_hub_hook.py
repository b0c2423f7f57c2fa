"""The JupyterHub hooks of etc/jupyterhub_config_snippet.py against a real `kernel-bridge serve`
(full site in a box). JupyterHub itself is not started here (test_jupyterhub.py starts it): the
hooks are loaded the way JupyterHub loads a config file (with its get_config()) and called with the
objects JupyterHub passes them (a spawner whose user has auth_state; post_auth_hook's
authentication dict), so that their failure paths can be driven one by one.

Shows: the pre-spawn hook pushes the user's token over the Unix socket, the bridge then submits that
user's kernel job with it (the site accepts it: the job runs); the post-auth hook pushes too, with
the expiry; the token never appears in the hub's log; an expired token, a token the bridge refuses
and an unreachable bridge each give the operator a clear message, and a missing auth_state only a
warning (the notebook server still starts).

Run: /usr/bin/python3 tests/integration/test_hub_hook.py   (needs root; exit 77 = skipped where
network namespaces cannot be made).
"""
import asyncio
import io
import logging
import os
import runpy
import sys
import time
import unittest
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kbtest import NeedsNetns, SRC, main  # noqa: E402
from fullsite import FullSite  # noqa: E402

SNIPPET = os.path.join(SRC, "etc", "jupyterhub_config_snippet.py")
HUB_USER = "root"  # the hub's Unix user: an admin of the bridge (it acts for every user)


class _Section:
    """Stands in for traitlets' Config: attribute sections, created on first use."""

    def __getattr__(self, name):
        value = _Section()
        object.__setattr__(self, name, value)
        return value


class _User:
    def __init__(self, name, auth_state):
        self.name = name
        self._auth_state = auth_state

    async def get_auth_state(self):
        return self._auth_state


class _Spawner:
    def __init__(self, user, log):
        self.user = user
        self.log = log


class HubHook(unittest.TestCase):
    fs = None

    @classmethod
    def setUpClass(cls):
        cls.fs = FullSite(admin_users=(HUB_USER,), queue_delay=0.5, restart_grace="2s")
        cls.fs.__enter__()
        if not cls.fs.box.netns:
            cls.fs.__exit__(None, None, None)
            cls.fs = None
            raise NeedsNetns("network namespaces are not available on this machine")
        os.environ["KERNEL_BRIDGE_SOCKET"] = cls.fs.socket_path
        os.environ.pop("KERNEL_BRIDGE_URL", None)
        cls.config = _Section()
        cls.hub = runpy.run_path(SNIPPET, init_globals={"get_config": lambda: cls.config})

    @classmethod
    def tearDownClass(cls):
        if cls.fs is not None:
            cls.fs.__exit__(None, None, None)

    def setUp(self):
        self.log_text = io.StringIO()
        self.log = logging.getLogger(f"hub-{self.id()}")
        self.log.setLevel(logging.DEBUG)
        self.log.addHandler(logging.StreamHandler(self.log_text))

    def credentials(self, user):
        status, body = self.fs.api("GET", f"/v1/users/{user}/credentials")
        self.assertEqual(status, 200, body)
        return body

    def test_hooks_are_installed(self):
        self.assertIs(self.config.Spawner.pre_spawn_hook, self.hub["kernel_bridge_pre_spawn_hook"])
        self.assertIs(self.config.Authenticator.post_auth_hook,
                      self.hub["kernel_bridge_post_auth_hook"])

    def test_pre_spawn_pushes_the_token_and_the_bridge_submits_with_it(self):
        token = self.fs.tokens["alice"]
        # OAuthenticator's auth_state: the token response is kept whole under "token_response".
        auth_state = {"access_token": token,
                      "token_response": {"access_token": token, "expires_in": 3600}}
        spawner = _Spawner(_User("alice", auth_state), self.log)
        asyncio.run(self.config.Spawner.pre_spawn_hook(spawner))
        cred = self.credentials("alice")
        self.assertEqual(cred["status"], "valid")
        self.assertTrue(cred.get("expires_at"), cred)
        self.assertIn("UNICORE token of alice pushed", self.log_text.getvalue())
        self.assertNotIn(token, self.log_text.getvalue())
        # The bridge uses that token for alice's kernel: the site accepts it and runs the job.
        ports = {f"{ch}_port": 47000 + i for i, ch in
                 enumerate(("shell", "iopub", "stdin", "control", "hb"))}
        body = {"site": self.fs.site_name,
                "connection": {"ip": "127.0.0.1", "transport": "tcp", "key": "k",
                               "signature_scheme": "hmac-sha256", **ports}}
        status, created = self.fs.api("POST", "/v1/kernels", body,
                                      headers={"X-Kernel-Bridge-User": "alice"})
        self.assertEqual(status, 201, created)
        kid = created["id"]
        try:
            deadline = time.time() + 120
            view = created
            while time.time() < deadline and view["state"] not in ("starting", "connecting",
                                                                      "ready", "ended"):
                time.sleep(0.3)
                view = self.fs.api("GET", f"/v1/kernels/{kid}",
                                   headers={"X-Kernel-Bridge-User": "alice"})[1]
            self.assertIn(view["state"], ("starting", "connecting", "ready"), view)
            self.assertTrue(view["job"]["id"], view)
        finally:
            self.fs.api("DELETE", f"/v1/kernels/{kid}", headers={"X-Kernel-Bridge-User": "alice"})

    def test_post_auth_pushes_with_the_expiry_and_returns_the_authentication(self):
        expires = int(time.time()) + 1800
        auth = {"name": "bob", "auth_state": {"access_token": self.fs.tokens["bob"],
                                              "expires_at": expires}}
        out = asyncio.run(self.config.Authenticator.post_auth_hook(_Auth(self.log),
                                                                   None, auth))
        self.assertIs(out, auth)
        cred = self.credentials("bob")
        self.assertEqual(cred["status"], "valid")
        self.assertTrue(cred["expires_at"].startswith(
            time.strftime("%Y-%m-%dT%H:%M", time.gmtime(expires))), cred)
        self.assertNotIn(self.fs.tokens["bob"], self.log_text.getvalue())

    def test_expired_refused_and_unreachable_are_clear(self):
        push = self.hub["push_unicore_token"]
        with self.assertRaisesRegex(RuntimeError, "has expired already; log in again"):
            push("alice", "tok-x", expires_at=time.time() - 10)
        with self.assertRaisesRegex(RuntimeError, r"kernel-bridge refused the token of alice: HTTP 400"):
            push("alice", "two words")
        with mock.patch.dict(push.__globals__, {"KERNEL_BRIDGE_SOCKET": "/nonexistent.sock"}):
            with self.assertRaisesRegex(RuntimeError, "cannot reach kernel-bridge at /nonexistent.sock"):
                push("alice", "tok-x")

    def test_missing_auth_state_only_warns(self):
        before = self.credentials("carol")["status"]
        spawner = _Spawner(_User("carol", None), self.log)
        asyncio.run(self.config.Spawner.pre_spawn_hook(spawner))  # must not raise
        self.assertIn("no access token in auth_state of carol", self.log_text.getvalue())
        self.assertEqual(self.credentials("carol")["status"], before)


class _Auth:
    def __init__(self, log):
        self.log = log


if __name__ == "__main__":
    main()
