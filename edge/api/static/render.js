// edge-llm chat page: a reply's markdown as elements.
// marked (CommonMark + GitHub tables, lists, links) turns the text into HTML, DOMPurify keeps
// only harmless elements and attributes, highlight.js colours code blocks. All three are
// vendored beside this file (LICENSES.txt): the page needs no network but its own server.
// HTML the model writes is never markup: the renderer escapes it, so `<b>` shows as `<b>`,
// and DOMPurify stands behind that. Images become links (nothing is loaded from a reply).
"use strict";

const Render = (() => {
  const ESC = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const escapeHtml = (s) => String(s).replace(/[&<>"']/g, (c) => ESC[c]);

  const ready = typeof marked !== "undefined" && typeof DOMPurify !== "undefined";
  let md = null;
  if (ready) {
    md = new marked.Marked({
      gfm: true,
      breaks: true,        // a model's single newline is a line break, as in a chat
      renderer: {
        html(token) {      // raw HTML in the reply: shown as the characters it is
          const text = escapeHtml(token.raw !== undefined ? token.raw : token.text);
          return token.block ? `<p>${text}</p>` : text;
        },
        image(token) {     // a link to the image instead of loading it
          return `<a href="${escapeHtml(token.href)}">${escapeHtml(token.text || token.href)}</a>`;
        },
      },
    });
    DOMPurify.addHook("afterSanitizeAttributes", (node) => {
      if (node.tagName === "A") {
        node.setAttribute("target", "_blank");
        node.setAttribute("rel", "noopener noreferrer nofollow");
      }
    });
  }
  if (typeof hljs !== "undefined") hljs.configure({ ignoreUnescapedHTML: true });

  const PURIFY = {
    RETURN_DOM_FRAGMENT: true,
    ALLOW_DATA_ATTR: false,
    FORBID_TAGS: ["style", "img", "svg", "math", "form", "input", "button", "textarea", "select", "iframe", "video", "audio"],
    FORBID_ATTR: ["style", "src", "srcset"],
  };

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // `container`'s children become `text` rendered; code blocks get highlighting and a Copy button.
  function markdown(container, text) {
    if (!md) {                               // the vendored libraries did not load: plain text
      container.replaceChildren(el("p", "plain", text));
      return;
    }
    const fragment = DOMPurify.sanitize(md.parse(text), PURIFY);
    for (const code of fragment.querySelectorAll("pre > code")) {
      const lang = (/\blanguage-([\w+#.-]+)/.exec(code.className) || [])[1];
      if (typeof hljs !== "undefined" && lang && hljs.getLanguage(lang)) {
        try { hljs.highlightElement(code); } catch (e) { /* leave it plain */ }
      }
      code.parentElement.append(copyButton(() => code.textContent));
    }
    container.replaceChildren(fragment);
  }

  function copyButton(getText) {
    const b = el("button", "copy", "Copy");
    b.type = "button";
    b.title = "Copy to the clipboard";
    b.addEventListener("click", async () => {
      const ok = await copyText(getText());
      b.textContent = ok ? "Copied" : "Copy failed";
      setTimeout(() => { b.textContent = "Copy"; }, 1200);
    });
    return b;
  }

  async function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      try { await navigator.clipboard.writeText(text); return true; } catch (e) { /* fall through */ }
    }
    const ta = el("textarea");          // plain http on a LAN address has no clipboard API
    ta.value = text;
    ta.setAttribute("readonly", "");
    ta.style.position = "fixed"; ta.style.opacity = "0";
    document.body.append(ta);
    ta.select();
    let ok = false;
    try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
    ta.remove();
    return ok;
  }

  return { markdown, copyButton, el };
})();
