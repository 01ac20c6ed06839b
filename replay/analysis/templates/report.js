// replay report: copy buttons for the curl commands, and a filter over the endpoint table.
(function () {
  "use strict";
  function copyText(text, button) {
    function done(ok) {
      button.textContent = ok ? "copied" : "select and copy";
      setTimeout(function () { button.textContent = "copy"; }, 1500);
    }
    function fallback() {
      var area = document.createElement("textarea");
      area.value = text;
      document.body.appendChild(area);
      area.select();
      var ok = false;
      try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
      document.body.removeChild(area);
      done(ok);
    }
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(function () { done(true); }, fallback);
    } else {
      fallback();
    }
  }
  document.querySelectorAll("button.copy").forEach(function (b) {
    b.addEventListener("click", function () {
      var pre = document.getElementById(b.getAttribute("data-for"));
      if (pre) { copyText(pre.textContent, b); }
    });
  });
  var input = document.getElementById("filter");
  var table = document.getElementById("endpoints");
  if (input && table) {
    input.hidden = false;
    input.addEventListener("input", function () {
      var q = input.value.toLowerCase();
      table.querySelectorAll("tbody tr").forEach(function (tr) {
        tr.hidden = q !== "" && tr.getAttribute("data-name").toLowerCase().indexOf(q) < 0;
      });
    });
  }
})();
