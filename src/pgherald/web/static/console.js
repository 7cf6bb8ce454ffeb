// pgherald's web console: the little that htmx does not do by itself.
// Announces live changes to screen readers (politely, as a count) and says when the live
// stream was closed because the session ended.
(function () {
  "use strict";
  var arrived = 0;

  function status(text) {
    var el = document.getElementById("live-status");
    if (el) { el.textContent = text; }
  }

  document.body.addEventListener("htmx:sseOpen", function () {
    status(arrived ? arrived + " new since this page opened · live" : "Live: new changes appear at the top.");
  });

  document.body.addEventListener("htmx:sseMessage", function () {
    arrived += 1;
    status(arrived + (arrived === 1 ? " new change" : " new changes") + " since this page opened · live");
  });

  document.body.addEventListener("htmx:sseError", function () {
    status("Live updates interrupted; reconnecting…");
  });

  document.body.addEventListener("htmx:sseClose", function (event) {
    if (event.detail && event.detail.type === "message") {
      status("Your session ended: reload the page to sign in again.");
    }
  });
})();
