// A short message at the bottom of the page (the #toast live region in index.html).

export function toast(message: string): void {
  const el = document.getElementById("toast")!;
  el.textContent = message;
  el.classList.add("show");
  setTimeout(() => el.classList.remove("show"), 2500);
}
