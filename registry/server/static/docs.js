// Starts Swagger UI on /docs. A file rather than an inline script: the page's Content-Security-Policy allows
// only scripts from this origin.
window.ui = SwaggerUIBundle({
  url: "/openapi.json",  // needs a read token: the browser sends the login cookie
  dom_id: "#swagger-ui",
  deepLinking: true,
  showExtensions: true,  // x-registry-role: the role each operation needs
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
