"""``panda demo`` opens the dashboard in the browser where there is one, once it answers, and
prints its URL always."""

from __future__ import annotations

import http.server
import threading

import pytest

from trainer import cli, launch


class _Running:
    """A stand-in for the dashboard's process: still running."""

    def poll(self):
        return None


class _Ended:
    def poll(self):
        return 1


@pytest.fixture
def health_server():
    """A server answering Streamlit's health check, like a started dashboard."""

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/_stcore/health" else 404)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(("platform", "env", "expected"), [
    ("linux", {}, False),
    ("linux", {"DISPLAY": ":0"}, True),
    ("linux", {"WAYLAND_DISPLAY": "wayland-0"}, True),
    ("linux", {"BROWSER": "firefox"}, True),
    ("darwin", {}, True),
    ("win32", {}, True),
])
def test_a_browser_is_available_only_with_a_display(platform, env, expected):
    assert launch.browser_available(platform, env) is expected


def test_the_page_opens_once_the_dashboard_answers(health_server, monkeypatch):
    monkeypatch.setenv("DISPLAY", ":0")
    opened = []
    assert launch.open_when_serving(health_server, _Running(), timeout=10,
                                    opener=lambda url: opened.append(url) or True)
    assert opened == [health_server]


def test_no_browser_no_display_or_no_server_opens_nothing(health_server, monkeypatch):
    opened = []

    def opener(url):
        opened.append(url)
        return True

    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.delenv("BROWSER", raising=False)
    if launch.browser_available():  # macOS / Windows: always a browser
        pytest.skip("this platform always has a browser")
    assert not launch.open_when_serving(health_server, _Running(), opener=opener)
    monkeypatch.setenv("DISPLAY", ":0")
    assert not launch.open_when_serving("http://127.0.0.1:9", _Ended(), opener=opener)
    assert opened == []


def test_demo_has_no_browser_flag_and_a_url_a_browser_reaches():
    args = cli.build_parser().parse_args(["demo", "--no-browser", "--host", "0.0.0.0"])
    assert args.no_browser is True
    assert cli._browsable(args.host) == "127.0.0.1"
    assert cli._browsable("127.0.0.1") == "127.0.0.1"


def test_the_dashboard_serves_app_static_on_a_starlette_streamlit(tmp_path, monkeypatch):
    """``panda dashboard`` turns on Streamlit's static files (where the chart's plotly.js lies,
    see app.stream_chart) and creates app/static/ first; a Streamlit without its Starlette
    server (older ones serve .js there as text/plain) is started without them."""
    main = tmp_path / "app" / "main.py"
    main.parent.mkdir()
    main.write_text("")
    command = launch.dashboard_command(tmp_path / "runs")
    flag = command.index("--server.enableStaticServing")
    assert command[flag + 1] == "true" and command.index("--") > flag
    assert launch._static_dir_ready(str(main)) and (main.parent / "static").is_dir()
    fake = tmp_path / "old_streamlit"
    (fake / "web" / "server").mkdir(parents=True)
    monkeypatch.setattr(launch.importlib.util, "find_spec", lambda name: type(
        "Spec", (), {"submodule_search_locations": [str(fake)]})())
    assert not launch._static_dir_ready(str(main))
