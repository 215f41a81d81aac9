// Starts Swagger UI on /docs with this server's own document. validatorUrl null: Swagger UI would
// otherwise send the document to validator.swagger.io, and this page reaches nothing but its server.
window.addEventListener("load", () => {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    validatorUrl: null,
    deepLinking: false,
    persistAuthorization: false,
  });
});
