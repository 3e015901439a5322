// plotly.js' sources come without types: src/plotly.ts registers the trace types the views draw.
declare module "plotly.js/lib/core";
declare module "plotly.js/lib/bar";
declare module "plotly.js/lib/heatmap";
