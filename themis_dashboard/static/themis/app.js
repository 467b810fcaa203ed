// The few behaviours the pages need beyond htmx. The Content-Security-Policy forbids inline
// script, so they are declared with data- attributes and bound here.
(function () {
  "use strict";

  // <form data-confirm="Question?">: asks before the form is sent.
  document.addEventListener("submit", function (event) {
    var question = event.target.getAttribute && event.target.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      event.preventDefault();
    }
  });

  // <button data-check="selector" data-checked="true|false">: ticks or clears every box.
  document.addEventListener("click", function (event) {
    var button = event.target.closest && event.target.closest("[data-check]");
    if (!button) {
      return;
    }
    var checked = button.getAttribute("data-checked") === "true";
    document.querySelectorAll(button.getAttribute("data-check")).forEach(function (box) {
      box.checked = checked;
    });
  });
  // Live pages (updates.live). A <div sse-connect> holds the page's event stream; the live
  // part inside it ([data-live-part]) is fetched on each `changed` event. While the stream is
  // not open (connecting, refused, Redis down) the part is asked for every data-live-poll ms,
  // as it was before streams. data-live-state on the stream's element says which it is.
  function liveRegion(element) {
    return element.closest ? element.closest("[sse-connect]") : null;
  }
  function setLiveState(event, state) {
    var region = liveRegion(event.target);
    if (region) {
      region.setAttribute("data-live-state", state);
    }
  }
  document.addEventListener("htmx:sseOpen", function (event) { setLiveState(event, "open"); });
  document.addEventListener("htmx:sseError", function (event) { setLiveState(event, "down"); });
  document.addEventListener("htmx:sseClose", function (event) { setLiveState(event, "down"); });

  window.setInterval(function () {
    document.querySelectorAll("[sse-connect]").forEach(function (region) {
      var part = region.querySelector("[data-live-part]");
      if (!part) {
        // The page stopped being live (its job or rollout ended): let go of the stream. The
        // extension closes it at its next message or when the server ends it.
        region.replaceWith.apply(region, Array.prototype.slice.call(region.childNodes));
        return;
      }
      if (region.getAttribute("data-live-state") === "open") {
        return;
      }
      var due = Number(part.getAttribute("data-live-poll")) || 500;
      var last = Number(region.getAttribute("data-live-polled")) || 0;
      if (Date.now() - last >= due) {
        region.setAttribute("data-live-polled", String(Date.now()));
        window.htmx.trigger(part, "themis:poll");
      }
    });
  }, 100);
})();
