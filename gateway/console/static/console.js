// hidream-gateway console: copy buttons. Every page works without this file.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  // Copy buttons are hidden in the HTML and shown only where the clipboard can be used.
  if (navigator.clipboard) {
    for (const button of document.querySelectorAll("button.copy[data-copy]")) {
      button.hidden = false;
      button.addEventListener("click", async () => {
        const source = document.getElementById(button.dataset.copy);
        if (!source) return;
        const label = button.textContent;
        try {
          await navigator.clipboard.writeText(source.textContent);
          button.textContent = "Copied";
        } catch (err) {
          button.textContent = "Copy failed";
        }
        setTimeout(() => { button.textContent = label; }, 1500);
      });
    }
  }
});
