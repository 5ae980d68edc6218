"""A headless Chromium for the web view's tests, its screenshot and its bench row.

    ensure_chromium() -> None | why not     the distribution's chromium + chromium-driver, installed
                                            with apt-get when missing and we are root
    new_driver(width, height)               a Selenium WebDriver on that Chromium (selenium: the
                                            `test` and `bench` extras)
"""
from __future__ import annotations

import os
import shutil
import subprocess

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def ensure_chromium() -> str | None:
    """None when Chromium and its driver are there (installed now if need be), else why not."""
    if os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"{CHROMIUM} or {CHROMEDRIVER} missing, and apt-get cannot install them here (not root or no apt-get)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=300", "chromium", "chromium-driver"]):
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            return f"{' '.join(cmd)} took more than 900 s"
        if r.returncode:
            return f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip()[-400:]}"
    return None if os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER) else "apt-get installed no chromium"


COMMAND_TIMEOUT_S = 60


def new_driver(width: int = 1500, height: int = 1000):
    """Selenium's Chrome driver on the distribution's Chromium, headless, at width x height CSS pixels."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--window-size={width},{height}", "--force-device-scale-factor=1"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    # every wait has a timeout: a command chromedriver never answers (a hung renderer) fails after
    # COMMAND_TIMEOUT_S instead of blocking its caller forever (selenium's default: no timeout)
    driver.command_executor.client_config.timeout = COMMAND_TIMEOUT_S
    driver.set_page_load_timeout(COMMAND_TIMEOUT_S)
    driver.set_script_timeout(COMMAND_TIMEOUT_S)
    return driver
