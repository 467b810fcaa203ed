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
})();
