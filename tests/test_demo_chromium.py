"""The browser demo (--ws-demo) in real headless Chromium, driven by Playwright.

Two pages chat; one reloads and sees its history and unread counts; one goes
offline and catches up; a read receipt shows on the sender's page.  Three
pages chat in a group made from the page, with unread counts that follow.
Screenshots go to artefacts/demo/ (gitignored).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from test_websocket import start_ws_relay

CHROMIUM = "/usr/bin/chromium"
ARTEFACTS = Path(__file__).resolve().parent.parent / "artefacts" / "demo"
playwright_api = pytest.importorskip("playwright.async_api")
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium is not installed")
WAIT = 10_000


async def sign_in(browser, url: str, token: str):
    context = await browser.new_context()
    page = await context.new_page()
    page.on("pageerror", lambda e: print("pageerror:", e))
    await page.goto(url)
    await page.fill("#token", token)
    await page.click("#signin-btn")
    await page.wait_for_selector("#state.connected", timeout=WAIT)
    return page


@pytest.fixture
async def demo(relay_factory):
    """``(relay, browser, url)``: a relay serving the demo, and headless Chromium."""
    relay = start_ws_relay(relay_factory, "--ws-demo")
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            yield relay, browser, relay.ws_url.replace("ws://", "http://")
        finally:
            await browser.close()


async def test_two_pages_chat_reload_offline_and_read_receipt(demo) -> None:
    relay, browser, url = demo
    alice = await sign_in(browser, url, relay.token("alice"))
    bob = await sign_in(browser, url, relay.token("bob"))
    # Alice starts a direct chat with bob and writes.
    await alice.fill("#new-dm", "bob")
    await alice.click("#new-dm-btn")
    await alice.fill("#text", "hello bob")
    await alice.click("#send-form button")
    await alice.wait_for_selector("#log .msg:has-text('hello bob')", timeout=WAIT)
    # Bob's list shows the conversation with one unread, and alice online.
    row = bob.locator("#convs .conv", has_text="alice")
    await row.locator(".unread", has_text="1").wait_for(timeout=WAIT)
    await row.locator(".dot.online").wait_for(timeout=WAIT)
    await bob.screenshot(path=str(ARTEFACTS / "1-bob-unread.png"))
    # Bob reloads: signed in again, history and the unread count are there.
    await bob.reload()
    await bob.wait_for_selector("#state.connected", timeout=WAIT)
    await row.locator(".unread", has_text="1").wait_for(timeout=WAIT)
    await row.click()
    await bob.wait_for_selector("#log .msg:has-text('alice: hello bob')", timeout=WAIT)
    # Opening it read the message: alice's page shows the receipt.
    await alice.wait_for_selector("#log .msg:has-text('hello bob') .read", timeout=WAIT)
    await alice.screenshot(path=str(ARTEFACTS / "2-alice-read.png"))
    # Bob goes offline; alice writes twice; bob comes back and catches up.
    await bob.click("#offline-btn")
    await bob.wait_for_selector("#state.closed", timeout=WAIT)
    for text in ("while you were away", "second one"):
        await alice.fill("#text", text)
        await alice.click("#send-form button")
        await alice.wait_for_selector(f"#log .msg:has-text('{text}')", timeout=WAIT)
    await bob.screenshot(path=str(ARTEFACTS / "3-bob-offline.png"))
    await bob.click("#offline-btn")
    await bob.wait_for_selector("#state.connected", timeout=WAIT)
    await bob.wait_for_selector("#log .msg:has-text('alice: second one')", timeout=WAIT)
    texts = await bob.locator("#log .msg").all_inner_texts()
    assert texts == ["alice: hello bob", "alice: while you were away", "alice: second one"]
    await bob.screenshot(path=str(ARTEFACTS / "4-bob-caught-up.png"))


async def test_group_chat_between_three_pages_with_unread_counts(demo) -> None:
    relay, browser, url = demo
    alice, bob, carol = [await sign_in(browser, url, relay.token(user))
                         for user in ("alice", "bob", "carol")]
    # Alice creates the group with bob and carol, and writes in it.
    await alice.fill("#new-group", "team")
    await alice.fill("#new-members", "bob, carol")
    await alice.click("#new-group-btn")
    await alice.wait_for_selector("#title:has-text('group:team')", timeout=WAIT)
    await alice.fill("#text", "hello team")
    await alice.click("#send-form button")
    await alice.wait_for_selector("#log .msg:has-text('alice: hello team')", timeout=WAIT)
    # The group appears in both members' lists, with the message unread.
    bob_row = bob.locator("#convs .conv", has_text="group:team")
    carol_row = carol.locator("#convs .conv", has_text="group:team")
    await bob_row.wait_for(timeout=WAIT)
    unread_before = int(await carol_row.locator(".unread").inner_text(timeout=WAIT))
    assert unread_before >= 1
    # Bob opens it, reads alice's message and answers: his count clears,
    # carol's grows by his message.
    await bob_row.click()
    await bob.wait_for_selector("#log .msg:has-text('alice: hello team')", timeout=WAIT)
    assert await bob_row.locator(".unread").count() == 0
    await bob.fill("#text", "hi both")
    await bob.click("#send-form button")
    await carol_row.locator(".unread", has_text=str(unread_before + 1)).wait_for(timeout=WAIT)
    await alice.wait_for_selector("#log .msg:has-text('bob: hi both')", timeout=WAIT)
    await carol.screenshot(path=str(ARTEFACTS / "5-carol-group-unread.png"))
    # Carol opens the group: both messages in order, her count cleared;
    # after a reload the server's count agrees (zero, no badge).
    await carol_row.click()
    await carol.wait_for_selector("#log .msg:has-text('bob: hi both')", timeout=WAIT)
    texts = [t for t in await carol.locator("#log .msg").all_inner_texts()
             if not t.startswith("·")]
    assert texts == ["alice: hello team", "bob: hi both"]
    assert await carol_row.locator(".unread").count() == 0
    await carol.reload()
    await carol.wait_for_selector("#state.connected", timeout=WAIT)
    # window.demo is set once sign-in has the server's unread counts drawn.
    await carol.wait_for_function("() => window.demo !== undefined", timeout=WAIT)
    await carol_row.wait_for(timeout=WAIT)
    assert await carol_row.locator(".unread").count() == 0
    # Carol writes after the reload; alice and bob, both in the group, see it.
    await carol_row.click()
    await carol.fill("#text", "back again")
    await carol.click("#send-form button")
    for page in (alice, bob):
        await page.wait_for_selector("#log .msg:has-text('carol: back again')", timeout=WAIT)
    await alice.screenshot(path=str(ARTEFACTS / "6-alice-group.png"))
