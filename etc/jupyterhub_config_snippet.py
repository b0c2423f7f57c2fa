# kernel-bridge: push each user's UNICORE access token from JupyterHub to the bridge.
#
# Append this to jupyterhub_config.py. It needs an OAuthenticator whose auth_state holds the user's
# access token for the site's UNICORE server (OIDC: the same identity provider UNICORE trusts):
#     c.Authenticator.enable_auth_state = True      # and JUPYTERHUB_CRYPT_KEY set
#     c.Authenticator.refresh_pre_spawn = True      # refresh an expired token before spawning
#     c.Authenticator.auth_refresh_age = 300        # refresh auth_state every 5 min on activity
# The token is sent to the bridge's control API with PUT /v1/users/{user}/credentials. The bridge
# keeps it in memory only (never logged, never written to disk) and uses it to submit and watch the
# user's kernel jobs.
#
# Two ways to reach the bridge:
#  - its Unix socket (the hub runs on the bridge's host): the hub's Unix user must be listed in
#    [api] admin_users, because it acts for other users;
#  - its TCP listener with a bearer token that has the admin right (tokens_file line
#    "<token> jupyterhub admin"): set KERNEL_BRIDGE_URL and KERNEL_BRIDGE_TOKEN_FILE.
# User names: the bridge identifies a kernel's owner by the Unix user running the kernelspec wrapper
# (the single-user server's user), so JupyterHub's user names must map to those Unix names;
# override kernel_bridge_user_name() below if they differ.
# Tested end to end with Debian 12's JupyterHub 3.0 (tests/integration/test_jupyterhub.py).
import datetime
import http.client
import json
import os
import socket
import time
import urllib.parse

KERNEL_BRIDGE_SOCKET = os.environ.get("KERNEL_BRIDGE_SOCKET", "/run/kernel-bridge/api.sock")
KERNEL_BRIDGE_URL = os.environ.get("KERNEL_BRIDGE_URL", "")  # e.g. http://127.0.0.1:8765
KERNEL_BRIDGE_TOKEN_FILE = os.environ.get("KERNEL_BRIDGE_TOKEN_FILE", "")


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=10):
        super().__init__("kernel-bridge", timeout=timeout)
        self._path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def kernel_bridge_user_name(hub_user_name):
    """The Unix user that owns this hub user's kernels (the single-user server's user)."""
    return hub_user_name


def _expires_at(auth_state):
    """The token's expiry as Unix seconds, if auth_state says (OAuthenticator keeps the token
    response's expires_in / expires_at in different places depending on the version)."""
    for key in ("expires_at", "access_token_expires_at"):
        value = auth_state.get(key)
        if isinstance(value, (int, float)):
            return int(value)
    token_response = auth_state.get("token_response") or {}
    if isinstance(token_response.get("expires_at"), (int, float)):
        return int(token_response["expires_at"])
    if isinstance(token_response.get("expires_in"), (int, float)):
        return int(time.time() + token_response["expires_in"])
    return None


def push_unicore_token(user_name, access_token, expires_at=None, log=None):
    """PUT /v1/users/{user}/credentials. Raises RuntimeError with the bridge's message on failure."""
    body = {"token": access_token}
    if expires_at:
        if expires_at <= time.time():
            raise RuntimeError("the UNICORE token of %s has expired already; log in again" % user_name)
        body["expires_at"] = int(expires_at)
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if KERNEL_BRIDGE_URL:
        url = urllib.parse.urlsplit(KERNEL_BRIDGE_URL)
        conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=10)
        with open(KERNEL_BRIDGE_TOKEN_FILE) as f:
            headers["Authorization"] = "Bearer " + f.readline().strip()
        where = KERNEL_BRIDGE_URL
    else:
        conn = _UnixHTTPConnection(KERNEL_BRIDGE_SOCKET)
        where = KERNEL_BRIDGE_SOCKET
    path = "/v1/users/%s/credentials" % urllib.parse.quote(kernel_bridge_user_name(user_name), safe="")
    try:
        conn.request("PUT", path, body=json.dumps(body), headers=headers)
        response = conn.getresponse()
        text = response.read().decode(errors="replace")
    except OSError as e:
        raise RuntimeError("cannot reach kernel-bridge at %s: %s (is `kernel-bridge serve` running?)"
                           % (where, e)) from e
    finally:
        conn.close()
    if response.status // 100 != 2:
        try:
            message = json.loads(text).get("error", text)
        except ValueError:
            message = text
        raise RuntimeError("kernel-bridge refused the token of %s: HTTP %d %s"
                           % (user_name, response.status, message))
    if log:
        # Never log the token itself.
        log.info("kernel-bridge: UNICORE token of %s pushed (expires %s)", user_name,
                 datetime.datetime.utcfromtimestamp(expires_at).isoformat() + "Z"
                 if expires_at else "unknown")


async def kernel_bridge_pre_spawn_hook(spawner):
    auth_state = await spawner.user.get_auth_state()
    if not auth_state or not auth_state.get("access_token"):
        spawner.log.warning("kernel-bridge: no access token in auth_state of %s; "
                            "remote kernels will fail with 'credentials missing' "
                            "(enable_auth_state and an OAuthenticator are required)",
                            spawner.user.name)
        return
    try:
        push_unicore_token(spawner.user.name, auth_state["access_token"],
                           _expires_at(auth_state), spawner.log)
    except RuntimeError as e:
        # The notebook server can still start; remote kernels will report the missing token.
        spawner.log.error("%s", e)


async def kernel_bridge_post_auth_hook(authenticator, handler, authentication):
    """Pushes the fresh token at every login. JupyterHub does not call this hook when it refreshes
    auth_state (auth_refresh_age); a token refreshed that way reaches the bridge at the next spawn
    or login. Kernels that outlive their token keep running (the bridge needs the token only to
    submit, watch and end jobs); their progress says that the site refused the token until a fresh
    one arrives (docs/lifecycle.md)."""
    auth_state = (authentication or {}).get("auth_state") or {}
    if auth_state.get("access_token"):
        try:
            push_unicore_token(authentication["name"], auth_state["access_token"],
                               _expires_at(auth_state), authenticator.log)
        except RuntimeError as e:
            authenticator.log.error("%s", e)
    return authentication


c = get_config()  # noqa: F821 (defined by JupyterHub when it loads this file)
c.Spawner.pre_spawn_hook = kernel_bridge_pre_spawn_hook
c.Authenticator.post_auth_hook = kernel_bridge_post_auth_hook
