//! The one dashboard definition (`infra/dashboard.json`): Terraform renders it into the
//! CloudWatch dashboard, and the live page draws the same widgets from the runner's metrics.

use geostream_shared::metrics::{MetricName, NAMESPACE};
use serde::{Deserialize, Serialize};

/// The definition as built into the runner.
pub const DEFINITION: &str = include_str!("../../infra/dashboard.json");

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Dashboard {
    pub title: String,
    pub widgets: Vec<Widget>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Widget {
    pub id: String,
    pub title: String,
    /// CloudWatch's statistic: `Sum` or `Maximum`.
    pub stat: String,
    pub metrics: Vec<WidgetMetric>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WidgetMetric {
    pub namespace: String,
    pub name: String,
    /// The logical function (or, for AWS/SQS, queue) the metric is of.
    pub of: String,
    pub label: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stat: Option<String>,
}

impl WidgetMetric {
    /// The GeoStream metric this is, or None for an AWS service metric (AWS only).
    pub fn geostream_metric(&self) -> Option<Result<MetricName, String>> {
        (self.namespace == NAMESPACE).then(|| self.name.parse())
    }
}

impl Dashboard {
    pub fn parse(text: &str) -> Result<Dashboard, String> {
        serde_json::from_str(text).map_err(|e| format!("infra/dashboard.json: {e}"))
    }

    /// Every (function, metric) of the GeoStream namespace the widgets draw.
    pub fn geostream_metrics(&self) -> Result<Vec<(String, MetricName)>, String> {
        let mut metrics = Vec::new();
        for widget in &self.widgets {
            for metric in &widget.metrics {
                if let Some(name) = metric.geostream_metric() {
                    let name = name.map_err(|e| format!("widget {}: {e}", widget.id))?;
                    metrics.push((metric.of.clone(), name));
                }
            }
        }
        Ok(metrics)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_definition_names_real_metrics_of_real_functions() {
        let dashboard = Dashboard::parse(DEFINITION).unwrap();
        let functions = [
            "ingest",
            "geo-update",
            "archiver",
            "anomaly-inspector",
            "query-api",
        ];
        let metrics = dashboard.geostream_metrics().unwrap();
        assert!(metrics.len() >= 20, "{metrics:?}");
        for (function, _) in &metrics {
            assert!(functions.contains(&function.as_str()), "{function}");
        }
        for widget in &dashboard.widgets {
            assert!(
                ["Sum", "Maximum"].contains(&widget.stat.as_str()),
                "{}",
                widget.id
            );
            for metric in &widget.metrics {
                assert!(
                    ["GeoStream", "AWS/Lambda", "AWS/SQS"].contains(&metric.namespace.as_str()),
                    "{}: {}",
                    widget.id,
                    metric.namespace
                );
            }
        }
    }

    #[test]
    fn an_unknown_metric_name_is_refused_with_its_widget() {
        let text = r#"{"title": "t", "widgets": [{"id": "w", "title": "w", "stat": "Sum",
            "metrics": [{"namespace": "GeoStream", "name": "EventsAccepted2", "of": "ingest", "label": "x"}]}]}"#;
        let error = Dashboard::parse(text)
            .unwrap()
            .geostream_metrics()
            .unwrap_err();
        assert_eq!(error, "widget w: EventsAccepted2 is not a GeoStream metric");
    }
}
