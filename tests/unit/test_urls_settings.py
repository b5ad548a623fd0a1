"""Table tests for URL rules, the address block list and settings from the environment."""

from __future__ import annotations

import ipaddress

import pytest

from engine.core.urls import UrlError, blocked_reason, check_url, host_ip
from engine.settings import Settings, SettingsError


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/hook",
        "https://example.com:8443/a/b?c=d",
        "https://[2001:db8::1]/x",
        "https://[fe80::1%25eth0]/x",
        "https://my_hooks.example.com/x",
        "https://exämple.com/x",
        "HTTPS://EXAMPLE.COM./x",
    ],
)
def test_check_url_accepts(url: str) -> None:
    assert check_url(url, allow_http=False) == url


@pytest.mark.parametrize(
    ("url", "allow_http", "fragment"),
    [
        ("http://example.com/", False, "https"),
        ("ftp://example.com/", True, "https"),
        ("example.com/hook", False, "https"),
        ("https://user:pw@example.com/", False, "user information"),
        ("https://example.com/#frag", False, "fragment"),
        ("https:///path", False, "host"),
        ("https://example.com/" + "a" * 2048, False, "2048"),
        ("https://exa mple.com/", False, "whitespace"),
        ("https://example.com:99999/", False, "malformed"),
        ("https://exa<mple.com/", False, "host name"),
        ("https://exa%41mple.com/", False, "host name"),
        ("https://exa!mple.com:8443/", False, "host name"),
    ],
)
def test_check_url_rejects(url: str, allow_http: bool, fragment: str) -> None:
    with pytest.raises(UrlError, match=fragment):
        check_url(url, allow_http=allow_http)


def test_http_allowed_for_local_development() -> None:
    assert check_url("http://example.com/", allow_http=True)


@pytest.mark.parametrize(
    ("host", "ip"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("[::1]", "::1"),
        ("::ffff:10.0.0.1", "::ffff:10.0.0.1"),
        ("example.com", None),
        ("cafe.be", None),
    ],
)
def test_host_ip(host: str, ip: str | None) -> None:
    assert host_ip(host) == (ipaddress.ip_address(ip) if ip else None)


@pytest.mark.parametrize(
    ("ip", "blocked"),
    [
        ("10.0.0.1", True),
        ("127.0.0.1", True),
        ("169.254.169.254", True),
        ("100.64.0.1", True),
        ("192.168.1.1", True),
        ("172.16.0.1", True),
        ("224.0.0.1", True),
        ("0.0.0.0", True),
        ("240.0.0.1", True),
        ("::1", True),
        ("fe80::1", True),
        ("fc00::1", True),
        ("::ffff:10.0.0.1", True),
        ("::ffff:127.0.0.1", True),
        ("2002:7f00:1::", True),  # 6to4 wrapping 127.0.0.1
        ("64:ff9b::a00:1", True),  # NAT64 wrapping 10.0.0.1
        ("93.184.216.34", False),
        ("2606:2800:220:1:248:1893:25c8:1946", False),
        ("::ffff:93.184.216.34", False),
    ],
)
def test_blocked_reason(ip: str, blocked: bool) -> None:
    assert (blocked_reason(ipaddress.ip_address(ip)) is not None) == blocked


def test_allowed_networks_exempt_addresses() -> None:
    loopback = [ipaddress.ip_network("127.0.0.0/8")]
    assert blocked_reason(ipaddress.ip_address("127.0.0.1"), loopback) is None
    assert blocked_reason(ipaddress.ip_address("::ffff:127.0.0.1"), loopback) is None
    assert blocked_reason(ipaddress.ip_address("10.0.0.1"), loopback) is not None


def test_settings_defaults() -> None:
    s = Settings.from_env({})
    assert s.database_url == "postgresql://postgres@127.0.0.1:5432/cargolint"
    assert s.amqp_url == "amqp://guest:guest@127.0.0.1:5672/"
    assert (s.api_host, s.api_port, s.metrics_port) == ("127.0.0.1", 8080, 9100)
    assert s.delivery_timeout == 30
    assert s.shutdown_grace == 25
    assert s.retry_schedule == (5, 300, 1800, 7200, 18000, 36000, 36000)
    assert s.allow_http is False
    assert s.allowed_networks == ()
    assert s.secret_keys == ()


def test_settings_from_env() -> None:
    s = Settings.from_env(
        {
            "CARGOLINT_RETRY_SCHEDULE": "200ms,1s,2s",
            "CARGOLINT_ALLOW_HTTP": "1",
            "CARGOLINT_ALLOWED_NETWORKS": "127.0.0.0/8, ::1/128",
            "CARGOLINT_ENDPOINT_RATE": "5.5",
            "CARGOLINT_ENDPOINT_CONCURRENCY": "3",
            "CARGOLINT_API_PORT": "9000",
        }
    )
    assert s.retry_schedule == (0.2, 1.0, 2.0)
    assert s.allow_http is True
    assert [str(n) for n in s.allowed_networks] == ["127.0.0.0/8", "::1/128"]
    assert (s.endpoint_rate, s.endpoint_concurrency, s.api_port) == (5.5, 3, 9000)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CARGOLINT_API_PORT", "http"),
        ("CARGOLINT_API_PORT", "70000"),
        ("CARGOLINT_DELIVERY_TIMEOUT", "0"),
        ("CARGOLINT_DELIVERY_TIMEOUT", "nan"),
        ("CARGOLINT_RETRY_SCHEDULE", "5s,soon"),
        ("CARGOLINT_ALLOW_HTTP", "maybe"),
        ("CARGOLINT_ALLOWED_NETWORKS", "10.0.0.0/33"),
        ("CARGOLINT_ENDPOINT_RATE", "-1"),
        ("CARGOLINT_ENDPOINT_CONCURRENCY", "0"),
        ("CARGOLINT_SECRET_KEY", "not-a-fernet-key"),
        ("CARGOLINT_CA_BUNDLE", "/nonexistent/ca.pem"),
        ("CARGOLINT_DATABASE_URL", "mysql://x"),
        ("CARGOLINT_AMQP_URL", "http://x"),
    ],
)
def test_settings_errors_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({name: value})
    assert caught.value.variable == name
    assert str(caught.value).startswith(name)
