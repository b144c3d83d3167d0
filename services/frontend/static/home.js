// Home page: send the form to the JSON API (with an upload progress bar) and go to the job page.
(function () {
  const form = document.getElementById("separate-form");
  if (!form) return;
  const errorBox = document.getElementById("form-error");
  const uploadBox = document.getElementById("upload");
  const uploadBar = document.getElementById("upload-progress");
  const uploadText = document.getElementById("upload-text");
  const button = document.getElementById("submit");

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = false;
    uploadBox.hidden = true;
    button.disabled = false;
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    errorBox.hidden = true;
    const data = new FormData(form);
    const file = document.getElementById("file").files[0];
    if (!file) data.delete("file");  // an empty file field would count as "a file"
    button.disabled = true;
    uploadBox.hidden = false;
    const request = new XMLHttpRequest();
    request.open("POST", "/api/separations");
    request.responseType = "json";
    request.upload.addEventListener("progress", function (e) {
      if (e.lengthComputable) {
        uploadBar.value = e.loaded / e.total;
        uploadText.textContent = "uploading " + Math.round(100 * e.loaded / e.total) + " %";
      }
    });
    request.addEventListener("load", function () {
      const body = request.response || {};
      if (request.status === 202 && body.links) {
        window.location.href = body.links.page;
      } else {
        showError(body.error || ("the server answered " + request.status));
      }
    });
    request.addEventListener("error", function () { showError("the server cannot be reached"); });
    request.send(data);
  });
})();
