"""
Browser tests of the chat page (static/ + serve.py), with Playwright driving Debian's Chromium headless (never a
downloaded browser): typing and streaming, Stop, images by button / drag-and-drop / paste, an uploaded audio file,
dictation from Chromium's fake microphone (transcribed by the real Whisper tiny.en into the message box before it
is sent), multi-turn context, conversations kept across a reload, safe rendering of hostile model output (and of
random Markdown), a server with an API key, and clear messages when the server refuses a request or speech is
unavailable. The model is a scripted stand-in (ScriptedChat) whose answer
describes what reached it, so the page's behaviour can be checked exactly. Screenshots go to tests/artifacts/, and
one conversation is saved as chat.png (docs/chat.png in the README is a copy).
"""

import base64
import io
import re
from pathlib import Path

import pytest

from serve import ServeConfig, create_app
from test_serve_api import WHISPER_PATH, ScriptedChat, live_server, one_torch_thread, speak  # noqa: F401 (autouse fixture)

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests/artifacts"
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's Chromium (/usr/bin/chromium) is not installed")

HOSTILE = ('Look: <script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"> and '
           '[click](javascript:window.pwned=3) <iframe src="javascript:window.pwned=4"></iframe>\n\n'
           '```html\n<script>window.pwned = 5</script>\n```')


def describe(messages, images):
    """The scripted answer: a Markdown summary of what reached the model."""
    last = messages[-1]["content"]
    if "hostile" in last:
        return HOSTILE
    if "long answer" in last:
        return "counting " * 600
    typed = [line for line in last.split("\n") if line and line != "<image>" and not line.startswith("(spoken)")]
    spoken = [line.removeprefix("(spoken) ") for line in last.split("\n") if line.startswith("(spoken)")]
    lines = ["**What reached the model**", ""]
    if images:
        sizes = ", ".join(f"{im.width}×{im.height}" for im in images)
        lines.append(f"- {len(images)} image{'s' if len(images) > 1 else ''} in this chat ({sizes} pixels)")
    if spoken:
        lines.append(f"- speech, heard as *{spoken[0]}*")
    if typed:
        lines.append(f"- your text: *{' '.join(typed)}*")
    if len(messages) > 1:
        lines.append(f"- {len(messages) - 1} earlier message{'' if len(messages) == 2 else 's'} of this conversation")
    if not images and not spoken:
        lines += ["", "Your turn as the chat template receives it:", "", "```text", last, "```"]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory):
    if not WHISPER_PATH.is_file():
        pytest.skip(f"real Whisper weights not found at {WHISPER_PATH}")
    return speak("What color is the sky?", tmp_path_factory.mktemp("browser") / "speech.wav")


@pytest.fixture(scope="module")
def chat():
    return ScriptedChat(describe, delay=0.02)


@pytest.fixture(scope="module")
def server(chat):
    with live_server(create_app(chat, ServeConfig())) as url:
        yield url


@pytest.fixture(scope="module")
def browser(speech_wav):
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-extensions",
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={speech_wav}%noloop"])
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 820}, color_scheme="light", bypass_csp=True,
                                  permissions=["microphone", "clipboard-read", "clipboard-write"])
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(server)
    page.wait_for_function("document.querySelector('#model-name').textContent !== 'connecting…'")
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def image_file(kind="shape"):
    from PIL import Image, ImageDraw
    if kind == "photo":
        from skimage import data
        image = Image.fromarray(data.chelsea())
    else:
        image = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(image).ellipse((12, 12, 52, 52), fill=(220, 40, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"name": f"{kind}.png", "mimeType": "image/png", "buffer": buffer.getvalue()}


def send(page, text):
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_for_answer(page, n):
    """Wait until the page shows n finished assistant messages; returns the last one."""
    page.wait_for_function(
        f"document.querySelectorAll('.message.assistant:not(.streaming)').length >= {n}", timeout=60_000)
    return page.locator(".message.assistant").nth(n - 1)


def drop_or_paste(page, file, event):
    page.evaluate("""([b64, name, event]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, { type: "image/png" }));
        if (event === "drop") {
            document.dispatchEvent(new DragEvent("dragenter", { dataTransfer: transfer, bubbles: true }));
            document.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
        } else {
            document.dispatchEvent(new ClipboardEvent("paste", { clipboardData: transfer, bubbles: true, cancelable: true }));
        }
    }""", [base64.b64encode(file["buffer"]).decode(), file["name"], event])


# -----------------------------------------------------------------------------

def test_conversation_with_text_images_speech_and_reload(page, chat, speech_wav):
    # 1. type and send: the answer streams in (Stop visible meanwhile), rendered as Markdown
    send(page, "Hello! What can you do?")
    page.wait_for_selector(".message.assistant.streaming")
    assert page.is_visible("#stop") and not page.is_visible("#send")
    answer = wait_for_answer(page, 1)
    assert "What reached the model" in answer.locator("strong").first.inner_text()
    assert "Hello! What can you do?" in answer.locator("em").first.inner_text()
    assert answer.locator("pre code").inner_text() == "Hello! What can you do?"
    assert page.is_visible("#send") and not page.is_visible("#stop")
    page.screenshot(path=str(ARTIFACTS / "1-text.png"))

    # 2. images: button (thumbnail, removable), drag and drop, paste; then send with text
    page.set_input_files("#image-file", [image_file("shape")])
    page.wait_for_selector(".attachments .thumb img")
    page.click(".attachments .thumb .remove")
    assert page.locator(".attachments .thumb").count() == 0
    page.set_input_files("#image-file", [image_file("photo")])
    page.wait_for_function("document.querySelectorAll('.attachments .thumb').length === 1")
    drop_or_paste(page, image_file("shape"), "drop")
    page.wait_for_function("document.querySelectorAll('.attachments .thumb').length === 2")
    drop_or_paste(page, image_file("shape"), "paste")
    page.wait_for_function("document.querySelectorAll('.attachments .thumb').length === 3")
    page.click(".attachments .thumb:nth-child(3) .remove")
    page.wait_for_function("document.querySelectorAll('.attachments .thumb').length === 2")
    send(page, "What is in these pictures?")
    answer = wait_for_answer(page, 2)
    assert "2 images in this chat (451×300, 64×64 pixels)" in answer.inner_text()
    assert page.locator(".message.user .images img").count() == 2
    call = chat.calls[-1]
    assert [m["role"] for m in call["messages"]] == ["user", "assistant", "user"]
    assert call["messages"][-1]["content"] == "<image>\n<image>\nWhat is in these pictures?"

    # 3. an uploaded audio file: the transcript appears under it
    page.set_input_files("#audio-file", str(speech_wav))
    page.wait_for_selector(".attachments .audio-chip audio")
    page.click("#send")
    page.wait_for_selector(".voice .transcript:not(.pending)", timeout=60_000)
    heard = page.locator(".voice .transcript").first.inner_text()
    assert "sky" in heard.lower(), heard
    answer = wait_for_answer(page, 3)
    assert "speech, heard as" in answer.inner_text()
    call = chat.calls[-1]  # multi-turn context: both earlier turns, images included, went back to the model
    assert len(call["messages"]) == 5 and len(call["images"]) == 2
    assert call["messages"][-1]["content"].startswith("(spoken) ") and "sky" in call["messages"][-1]["content"].lower()
    page.evaluate("document.querySelectorAll('.message.user')[1].scrollIntoView({block: 'start'})")
    page.screenshot(path=str(ARTIFACTS / "2-images-and-speech.png"))
    (ROOT / "docs").mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat.png"))  # docs/chat.png is a copy of it
    page.emulate_media(color_scheme="dark")
    page.screenshot(path=str(ARTIFACTS / "3-dark.png"))
    page.emulate_media(color_scheme="light")

    # 4. a later turn sends the earlier recording as its transcript, not the audio again
    send(page, "Thanks")
    wait_for_answer(page, 4)
    earlier = chat.calls[-1]["messages"][4]["content"]
    assert earlier.startswith("(spoken) ") and "sky" in earlier.lower()

    # 5. reload: the conversation is in the sidebar and comes back whole; new chat and delete work
    page.reload()
    page.wait_for_selector(".conversation.active")
    assert page.locator(".conversation").count() == 1
    assert page.locator(".message.assistant").count() == 4
    assert "sky" in page.locator(".voice .transcript").first.inner_text().lower()
    page.click("#new-chat")
    assert page.is_visible("#empty")
    send(page, "A second chat")
    wait_for_answer(page, 1)
    assert page.locator(".conversation").count() == 2
    page.click(".conversation:not(.active) .open")
    assert page.locator(".message.assistant").count() == 4
    page.hover(".conversation:not(.active)")
    page.click(".conversation:not(.active) .delete")
    assert page.locator(".conversation").count() == 1
    page.reload()
    page.wait_for_selector(".conversation")
    assert page.locator(".conversation").count() == 1


def test_dictation_with_the_fake_microphone(page, chat):
    page.fill("#input", "Please answer:")
    page.click("#record")
    page.wait_for_selector("#record.recording")
    page.wait_for_function("document.querySelector('#record-timer').textContent === '0:02'", timeout=10_000)
    assert page.is_disabled("#send")
    page.screenshot(path=str(ARTIFACTS / "4-recording.png"))
    page.click("#record")
    # the transcript lands in the message box, after what was typed, and nothing is sent yet
    page.wait_for_function("document.querySelector('#input').value.toLowerCase().includes('what color')",
                           timeout=60_000)  # heard through opus, "sky" may blur
    said = page.input_value("#input")
    assert said.startswith("Please answer: ") and page.locator(".message").count() == 0
    assert page.locator(".attachments .audio-chip").count() == 0 and page.is_enabled("#send")
    page.type("#input", " Briefly.")  # the user edits it
    page.click("#send")
    answer = wait_for_answer(page, 1)
    assert chat.calls[-1]["messages"][-1]["content"] == said + " Briefly."
    assert "your text:" in answer.inner_text() and page.locator(".message.user .bubble").inner_text() == said + " Briefly."


ALLOWED_TAGS = {"P", "BR", "CODE", "A", "STRONG", "EM", "H3", "H4", "H5", "UL", "OL", "LI", "DIV", "SPAN", "BUTTON", "PRE"}
RENDER = """(sources) => sources.map((source) => {
    const html = window.omniphi.renderMarkdown(source);
    const template = document.createElement("template");  // inert: nothing in it loads or runs
    template.innerHTML = html;
    const nodes = [...template.content.querySelectorAll("*")];
    return { source, html, tags: [...new Set(nodes.map((n) => n.tagName))],
             attributes: [...new Set(nodes.flatMap((n) => [...n.attributes].map((a) => `${n.tagName}.${a.name}`)))],
             links: [...template.content.querySelectorAll("a")].map((a) => [a.getAttribute("href"), a.innerHTML]) };
})"""


def test_markdown_holds_resolve_and_random_markdown_stays_safe(page):
    (link, nested, inside_url) = page.evaluate(RENDER, ["[`code`](https://x.example/a)",
                                                        "[**bold** and `c`](https://y.example) `[a](https://z.example)`",
                                                        "see https://a.example/`b`c and [x](https://b.example/`d`)"])
    assert link["links"] == [["https://x.example/a", "<code>code</code>"]] and "\0" not in link["html"]
    assert nested["links"] == [["https://y.example", "<strong>bold</strong> and <code>c</code>"]]
    assert "<code>[a](https://z.example)</code>" in nested["html"]
    assert all("\0" not in href for href, _ in inside_url["links"]) and "\0" not in inside_url["html"]
    tokens = ["`", "``", "```", "~~~", "[", "]", "(", ")", "](", "https://x.example/p", "http://y.example", "https://",
              "*", "**", "_", "__", " ", "\n", "\n\n", "- ", "1. ", "# ", "<b>", "</b>", "<img src=x onerror=alert(1)>",
              "<script>alert(1)</script>", "&", "&amp;", '"', "'", "\0", "word", "\t", "javascript:alert(1)"]
    rng = __import__("random").Random(0)
    sources = ["".join(rng.choice(tokens) for _ in range(rng.randint(1, 14))) for _ in range(3000)]
    for r in page.evaluate(RENDER, sources):
        assert "\0" not in r["html"], r
        assert set(r["tags"]) <= ALLOWED_TAGS, r
        assert set(r["attributes"]) <= {"A.href", "A.target", "A.rel", "DIV.class", "BUTTON.class", "BUTTON.type",
                                         "SPAN.class", "OL.start"}, r
        assert all(re.fullmatch(r"https?://[^\s\"<>\0]+", href) for href, _ in r["links"]), r


def test_model_output_cannot_inject_html(page):
    page.fill("#input", "say something")
    page.press("#input", "Shift+Enter")  # a new line, not a send
    page.type("#input", "hostile")
    assert page.locator(".message").count() == 0
    page.press("#input", "Enter")
    answer = wait_for_answer(page, 1)
    assert page.locator(".message.user .bubble").inner_text() == "say something\nhostile"
    content = answer.locator(".content")
    assert content.locator("script, img, iframe, a[href^='javascript']").count() == 0
    text = content.inner_text()
    assert "<script>window.pwned = 1</script>" in text and '<img src=x onerror="window.pwned = 2">' in text
    assert "[click](javascript:window.pwned=3)" in text
    assert page.evaluate("window.pwned") is None
    assert content.locator("pre code").inner_text() == "<script>window.pwned = 5</script>"
    content.locator(".copy-code").click()
    page.wait_for_function("document.querySelector('.copy-code').textContent === 'Copied'")
    assert page.evaluate("navigator.clipboard.readText()") == "<script>window.pwned = 5</script>"
    page.screenshot(path=str(ARTIFACTS / "5-hostile-output.png"))


def test_stop_and_refusals_are_clear(page, chat):
    send(page, "Please give a long answer")
    page.wait_for_function("(document.querySelector('.message.assistant .content') || {}).textContent?.includes('counting')")
    chat.closed.clear()
    page.click("#stop")
    answer = wait_for_answer(page, 1)
    assert answer.locator(".status").inner_text() == "Stopped."
    assert answer.inner_text().count("counting") < 600
    assert chat.closed.wait(5), "the server did not close the answer after Stop"
    send(page, "word " * 3000)  # longer than the scripted model's 2048-token context
    answer = wait_for_answer(page, 2)
    error = answer.locator(".error").inner_text()
    assert error.startswith("The server refused the request:") and "limit" in error
    send(page, "still there?")  # the refused turn is left out of the context
    wait_for_answer(page, 3)
    assert page.locator(".message.assistant .error").count() == 1
    page.screenshot(path=str(ARTIFACTS / "6-stop-and-refusal.png"))


def test_a_server_with_an_api_key(browser):
    chat = ScriptedChat("ok", vision=False, whisper=None)
    with live_server(create_app(chat, ServeConfig(api_key="page-key"))) as url:
        context = browser.new_context(color_scheme="light", bypass_csp=True)
        page = context.new_page()
        asked = []
        page.on("dialog", lambda dialog: (asked.append(dialog.message), dialog.accept("page-key")))
        page.goto(url)
        page.wait_for_function("document.querySelector('#model-name').textContent === 'API key needed'")
        send(page, "hello")
        assert wait_for_answer(page, 1).inner_text() == "ok" and len(asked) == 1 and "API key" in asked[0]
        page.wait_for_function("document.querySelector('#model-name').textContent === 'omniphi'")  # details, now
        send(page, "again")
        assert wait_for_answer(page, 2).inner_text() == "ok" and len(asked) == 1  # the key was kept
        context.close()


def test_speech_unavailable_is_explained_and_controls_are_off(browser, tmp_path):
    chat = ScriptedChat("ok", vision=False, whisper=tmp_path / "missing-whisper.pt")
    with live_server(create_app(chat, ServeConfig())) as url:
        context = browser.new_context(color_scheme="light", bypass_csp=True)  # lets Playwright evaluate its checks
        page = context.new_page()
        page.goto(url)
        page.wait_for_function("document.querySelector('#model-name').textContent !== 'connecting…'")
        assert "Speech input is off: Whisper checkpoint not found" in page.inner_text("#footnote")
        assert "missing-whisper.pt" in page.inner_text("#footnote")
        assert page.is_disabled("#record") and page.is_disabled("#attach-audio") and page.is_disabled("#attach-image")
        assert "vision tower" in page.get_attribute("#attach-image", "title")
        send(page, "text still works")
        assert wait_for_answer(page, 1).inner_text() == "ok"
        page.screenshot(path=str(ARTIFACTS / "7-no-speech.png"))
        context.close()
