//! Checks that the code and `infra/` agree: every environment variable a function reads is set
//! by Terraform (and nothing else), every permission the code needs is granted to that
//! function's role only on the named resources, and every table, key and index the adapters
//! use is declared the same way.
//!
//! Terraform is parsed with `hcl-rs`. The few expression forms the infrastructure uses for
//! policies (`concat(...)`, `local.x`, literal lists and objects) are resolved here; resource
//! references are compared as text (`aws_dynamodb_table.positions/index/geo-index`).

pub mod fleet;
pub mod fleet_events;
pub mod harness;
pub mod history;
pub mod http;
pub mod runtime_api;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use geostream_aws::manifest::{
    FunctionManifest, KeyType, MappingDefaults, Permission, TableSchema, FUNCTIONS,
    MAPPING_DEFAULTS, TABLES, TELEMETRY_READER_PERMISSIONS,
};
use geostream_aws::provision::ResourceNames;
use hcl::{Block, Body, Expression, ObjectKey, TemplateExpr, TraversalOperator};

/// All `.tf` files of a folder and its subfolders, parsed and merged.
pub fn parse_dir(dir: &Path) -> Result<Vec<(String, Body)>, String> {
    let mut bodies = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&folder)
            .map_err(|e| format!("{}: {e}", folder.display()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "tf") {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                let body = hcl::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
                bodies.push((path.display().to_string(), body));
            }
        }
    }
    Ok(bodies)
}

fn blocks<'a>(bodies: &'a [(String, Body)], kind: &'a str) -> impl Iterator<Item = &'a Block> + 'a {
    bodies
        .iter()
        .flat_map(move |(_, body)| body.blocks().filter(move |b| b.identifier() == kind))
}

fn label(block: &Block, index: usize) -> &str {
    block
        .labels()
        .get(index)
        .map(|l| l.as_str())
        .unwrap_or_default()
}

fn attribute<'a>(body: &'a Body, key: &str) -> Option<&'a Expression> {
    body.attributes().find(|a| a.key() == key).map(|a| a.expr())
}

/// Every `locals` entry.
fn locals(bodies: &[(String, Body)]) -> HashMap<String, Expression> {
    blocks(bodies, "locals")
        .flat_map(|b| b.body().attributes())
        .map(|a| (a.key().to_string(), a.expr().clone()))
        .collect()
}

/// Resolves `local.x` references, `concat(...)` and `merge(...)` calls and conditionals,
/// recursively.
fn resolve(expression: &Expression, locals: &HashMap<String, Expression>) -> Expression {
    match expression {
        Expression::Traversal(traversal) => match (&traversal.expr, traversal.operators.as_slice())
        {
            (Expression::Variable(variable), [TraversalOperator::GetAttr(name)])
                if variable.as_str() == "local" =>
            {
                match locals.get(name.as_str()) {
                    Some(value) => resolve(value, locals),
                    None => expression.clone(),
                }
            }
            _ => expression.clone(),
        },
        Expression::FuncCall(call) if call.name.name.as_str() == "merge" => Expression::Object(
            call.args
                .iter()
                .flat_map(|arg| match resolve(arg, locals) {
                    Expression::Object(object) => object.into_iter().collect::<Vec<_>>(),
                    _ => Vec::new(),
                })
                .collect(),
        ),
        Expression::FuncCall(call) if call.name.name.as_str() == "concat" => Expression::Array(
            call.args
                .iter()
                .flat_map(|arg| match resolve(arg, locals) {
                    Expression::Array(items) => items,
                    other => vec![other],
                })
                .collect(),
        ),
        // `cond ? [a] : [b]`: a deployment takes one branch; the checker takes both.
        Expression::Conditional(conditional) => {
            match (
                resolve(&conditional.true_expr, locals),
                resolve(&conditional.false_expr, locals),
            ) {
                (Expression::Array(mut yes), Expression::Array(no)) => {
                    yes.extend(no);
                    Expression::Array(yes)
                }
                (yes, _) => yes,
            }
        }
        Expression::Array(items) => {
            Expression::Array(items.iter().map(|i| resolve(i, locals)).collect())
        }
        Expression::Object(object) => Expression::Object(
            object
                .iter()
                .map(|(k, v)| (k.clone(), resolve(v, locals)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// A resource reference as text: `aws_kinesis_stream.telemetry.arn` ->
/// `aws_kinesis_stream.telemetry`; `"${aws_dynamodb_table.alerts.arn}/index/by-state"` ->
/// `aws_dynamodb_table.alerts/index/by-state`; `"*"` -> `*`.
fn reference(expression: &Expression) -> String {
    let text = match expression {
        Expression::String(text) => text.clone(),
        Expression::TemplateExpr(template) => match template.as_ref() {
            TemplateExpr::QuotedString(raw) => raw.clone(),
            TemplateExpr::Heredoc(heredoc) => heredoc.template.clone(),
        },
        other => hcl::format::to_string(other).unwrap_or_default(),
    };
    normalize(&text)
}

/// Interpolation marks, `[0]` (of resources with a count) and `.arn` dropped, so references
/// compare as plain names.
fn normalize(text: &str) -> String {
    text.replace("${", "")
        .replace('}', "")
        .replace("[0]", "")
        .replace(".arn", "")
        .trim()
        .to_string()
}

fn strings(expression: Option<&Expression>) -> Vec<String> {
    match expression {
        Some(Expression::Array(items)) => items.iter().map(reference).collect(),
        Some(other) => vec![reference(other)],
        None => Vec::new(),
    }
}

fn object_keys(expression: Option<&Expression>) -> BTreeSet<String> {
    match expression {
        Some(Expression::Object(object)) => object
            .keys()
            .map(|key| match key {
                ObjectKey::Identifier(identifier) => identifier.to_string(),
                ObjectKey::Expression(expression) => reference(expression),
                other => format!("{other:?}"),
            })
            .collect(),
        _ => BTreeSet::new(),
    }
}

/// The permissions a function module grants: (action, resource) pairs.
fn granted(module: &Block, locals: &HashMap<String, Expression>) -> BTreeSet<(String, String)> {
    let mut granted = BTreeSet::new();
    if let Some(Expression::Array(statements)) =
        attribute(module.body(), "policy_statements").map(|e| resolve(e, locals))
    {
        for statement in statements {
            let Expression::Object(object) = statement else {
                continue;
            };
            let field = |name: &str| {
                object
                    .iter()
                    .find(|(k, _)| matches!(k, ObjectKey::Identifier(i) if i.as_str() == name))
                    .map(|(_, v)| v)
            };
            for action in strings(field("actions")) {
                for resource in strings(field("resources")) {
                    granted.insert((action.clone(), resource));
                }
            }
        }
    }
    granted
}

/// The modules that deploy a function, by function name (`geo_update` -> `geo-update`); other
/// modules (the dashboard) deploy none.
fn function_modules(bodies: &[(String, Body)]) -> BTreeMap<String, &Block> {
    blocks(bodies, "module")
        .filter(|b| {
            matches!(attribute(b.body(), "source"), Some(Expression::String(source)) if source == "./modules/function")
        })
        .map(|b| (label(b, 0).replace('_', "-"), b))
        .collect()
}

/// The names of the environment variables a function module sets.
fn environment_keys(module: &Block, locals: &HashMap<String, Expression>) -> BTreeSet<String> {
    let environment = attribute(module.body(), "environment").map(|e| resolve(e, locals));
    object_keys(environment.as_ref())
}

/// The environment variables Terraform gives `function` (names only: the values are the
/// deployment's resources).
pub fn terraform_environment(root: &Path, function: &str) -> Result<BTreeSet<String>, String> {
    let bodies = parse_dir(&root.join("infra"))?;
    let locals = locals(&bodies);
    let modules = function_modules(&bodies);
    let module = modules
        .get(function)
        .ok_or_else(|| format!("no module for function {function} in infra/"))?;
    Ok(environment_keys(module, &locals))
}

/// Every disagreement between the code's manifest and the Terraform in `bodies`.
pub fn check(
    bodies: &[(String, Body)],
    functions: &[FunctionManifest],
    tables: &[TableSchema],
) -> Vec<String> {
    let mut problems = Vec::new();
    let locals = locals(bodies);
    let modules = function_modules(bodies);

    for function in functions {
        let Some(module) = modules.get(function.name) else {
            problems.push(format!(
                "function {}: no module \"{}\" in infra/",
                function.name,
                function.name.replace('-', "_")
            ));
            continue;
        };
        let set = environment_keys(module, &locals);
        let settings = function.settings();
        for setting in settings.iter().filter(|s| !s.optional) {
            if !set.contains(setting.name) {
                problems.push(format!(
                    "function {}: reads {}, which Terraform does not set",
                    function.name, setting.name
                ));
            }
        }
        for variable in &set {
            if !settings.iter().any(|s| s.name == variable) {
                problems.push(format!(
                    "function {}: Terraform sets {variable}, which the function does not read",
                    function.name
                ));
            }
        }
        let granted = granted(module, &locals);
        let needed: Vec<&Permission> = function
            .permissions
            .iter()
            .chain(if function.reads_telemetry {
                TELEMETRY_READER_PERMISSIONS
            } else {
                &[]
            })
            .collect();
        for permission in &needed {
            if !granted.contains(&(
                permission.action.to_string(),
                permission.resource.to_string(),
            )) {
                problems.push(format!(
                    "function {}: its role does not allow {} on {}",
                    function.name, permission.action, permission.resource
                ));
            }
        }
        for (action, resource) in &granted {
            let needed_here = needed
                .iter()
                .any(|p| p.action == action && p.resource == resource);
            // ListStreams takes no resource and is part of what an event source mapping needs.
            let mapping_extra =
                function.reads_telemetry && action == "kinesis:ListStreams" && resource == "*";
            if !needed_here && !mapping_extra {
                problems.push(format!("function {}: its role allows {action} on {resource}, which the code does not need", function.name));
            }
        }
    }
    for name in modules.keys() {
        if !functions.iter().any(|f| f.name == name) && name != "function" {
            problems.push(format!("module {name}: not a GeoStream function"));
        }
    }

    let tf_tables: BTreeMap<&str, &Block> = blocks(bodies, "resource")
        .filter(|b| label(b, 0) == "aws_dynamodb_table")
        .map(|b| (label(b, 1), b))
        .collect();
    let names = ResourceNames::with_prefix("${var.name_prefix}");
    for table in tables {
        let Some(block) = tf_tables.get(table.label) else {
            problems.push(format!(
                "table {}: no resource aws_dynamodb_table.{}",
                table.label, table.label
            ));
            continue;
        };
        let body = block.body();
        let expected_name = match table.label {
            "positions" => &names.positions_table,
            "alert_state" => &names.alert_state_table,
            "metric_names" => &names.metric_names_table,
            "geofences" => &names.geofences_table,
            "fleet_events" => &names.fleet_events_table,
            "history" => &names.history_table,
            "geofence_occupants" => &names.geofence_occupants_table,
            _ => &names.alerts_table,
        };
        let name = attribute(body, "name").map(reference).unwrap_or_default();
        let expected_name = normalize(expected_name);
        if name != expected_name {
            problems.push(format!(
                "table {}: Terraform names it {name:?}, the code {expected_name:?}",
                table.label
            ));
        }
        let attribute_types: HashMap<String, String> = body
            .blocks()
            .filter(|b| b.identifier() == "attribute")
            .map(|b| {
                (
                    attribute(b.body(), "name")
                        .map(reference)
                        .unwrap_or_default(),
                    attribute(b.body(), "type")
                        .map(reference)
                        .unwrap_or_default(),
                )
            })
            .collect();
        let check_key = |what: &str, key: (&str, KeyType), declared: Option<String>| {
            let mut problems = Vec::new();
            if declared.as_deref() != Some(key.0) {
                problems.push(format!(
                    "table {}: {what} is {declared:?} in Terraform, {:?} in the code",
                    table.label, key.0
                ));
            }
            let want = match key.1 {
                KeyType::String => "S",
                KeyType::Number => "N",
            };
            if attribute_types.get(key.0).map(String::as_str) != Some(want) {
                problems.push(format!(
                    "table {}: attribute {} must be declared with type {want}",
                    table.label, key.0
                ));
            }
            problems
        };
        problems.extend(check_key(
            "hash key",
            table.hash_key,
            attribute(body, "hash_key").map(reference),
        ));
        let declared_range_key = attribute(body, "range_key").map(reference);
        match table.range_key {
            Some(range_key) => {
                problems.extend(check_key("range key", range_key, declared_range_key));
            }
            None if declared_range_key.is_some() => problems.push(format!(
                "table {}: Terraform declares range key {declared_range_key:?}, the code none",
                table.label
            )),
            None => {}
        }
        let tf_indexes: BTreeMap<String, &Block> = body
            .blocks()
            .filter(|b| b.identifier() == "global_secondary_index")
            .map(|b| {
                (
                    attribute(b.body(), "name")
                        .map(reference)
                        .unwrap_or_default(),
                    b,
                )
            })
            .collect();
        for index in table.indexes {
            match tf_indexes.get(index.name) {
                None => problems.push(format!(
                    "table {}: index {} is not declared in Terraform",
                    table.label, index.name
                )),
                Some(block) => {
                    problems.extend(check_key(
                        &format!("index {} hash key", index.name),
                        index.hash_key,
                        attribute(block.body(), "hash_key").map(reference),
                    ));
                    problems.extend(check_key(
                        &format!("index {} range key", index.name),
                        index.range_key,
                        attribute(block.body(), "range_key").map(reference),
                    ));
                    let projection = attribute(block.body(), "projection_type").map(reference);
                    if projection.as_deref() != Some(index.projection.terraform_name()) {
                        problems.push(format!(
                            "table {}: index {} projects {projection:?} in Terraform, the code reads it as {}",
                            table.label,
                            index.name,
                            index.projection.terraform_name()
                        ));
                    }
                }
            }
        }
        for name in tf_indexes.keys() {
            if !table.indexes.iter().any(|i| i.name == name) {
                problems.push(format!(
                    "table {}: Terraform declares index {name}, which the code does not use",
                    table.label
                ));
            }
        }
    }
    problems.extend(check_mapping_defaults(bodies, MAPPING_DEFAULTS));
    problems.extend(check_magnetic_rejections(bodies));
    problems
}

/// A Timestream table that takes late readings into its magnetic store must say where the
/// store's asynchronous refusals go: without a location they are lost without a trace.
fn check_magnetic_rejections(bodies: &[(String, Body)]) -> Vec<String> {
    blocks(bodies, "resource")
        .filter(|block| label(block, 0) == "aws_timestreamwrite_table")
        .filter_map(|table| {
            let writes = table
                .body()
                .blocks()
                .find(|b| b.identifier() == "magnetic_store_write_properties")?;
            let enabled = attribute(writes.body(), "enable_magnetic_store_writes")
                .is_some_and(|e| matches!(e, Expression::Bool(true)));
            let located = writes
                .body()
                .blocks()
                .any(|b| b.identifier() == "magnetic_store_rejected_data_location");
            (enabled && !located).then(|| {
                format!(
                    "Timestream table {}: magnetic store writes without a rejected-data location",
                    label(table, 1)
                )
            })
        })
        .collect()
}

/// The event source mapping variables' defaults against what the runner's AWS backend uses.
fn check_mapping_defaults(bodies: &[(String, Body)], defaults: MappingDefaults) -> Vec<String> {
    let expected = [
        ("stream_batch_size", defaults.batch_size as u64),
        (
            "stream_batching_window_seconds",
            defaults.batching_window_seconds,
        ),
        ("stream_max_retries", u64::from(defaults.max_retries)),
        (
            "stream_max_record_age_seconds",
            defaults.max_record_age_seconds,
        ),
        ("archiver_batch_size", defaults.archiver_batch_size as u64),
        (
            "archiver_batching_window_seconds",
            defaults.archiver_batching_window_seconds,
        ),
    ];
    let mut problems = Vec::new();
    for (name, value) in expected {
        let default = blocks(bodies, "variable")
            .find(|b| label(b, 0) == name)
            .and_then(|b| attribute(b.body(), "default"))
            .and_then(|e| match e {
                Expression::Number(n) => n.as_u64(),
                _ => None,
            });
        if default != Some(value) {
            problems.push(format!(
                "variable {name}: Terraform's default is {default:?}, the runner's AWS backend uses {value} (geostream_aws::manifest::MAPPING_DEFAULTS)"
            ));
        }
    }
    problems
}

/// Checks the real `infra/` against the real manifest; `root` is the repository. (That a
/// `main` reads only the settings its manifest declares is enforced where they are read:
/// `geostream_aws::compose::Composition` refuses an undeclared one, and the Lambda-binaries
/// test runs every `main`.)
pub fn check_repository(root: &Path) -> Result<Vec<String>, String> {
    let bodies = parse_dir(&root.join("infra"))?;
    let mut problems = check(&bodies, FUNCTIONS, TABLES);
    problems.extend(check_tfvars_examples(&root.join("infra"), &bodies)?);
    Ok(problems)
}

/// Every variable the example tfvars set (commented-out lines included) is declared.
fn check_tfvars_examples(infra: &Path, bodies: &[(String, Body)]) -> Result<Vec<String>, String> {
    let declared: BTreeSet<&str> = blocks(bodies, "variable").map(|b| label(b, 0)).collect();
    let mut problems = Vec::new();
    for entry in std::fs::read_dir(infra).map_err(|e| e.to_string())? {
        let path = entry.map_err(|e| e.to_string())?.path();
        if !path.to_string_lossy().ends_with(".tfvars.example") {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
        // Commented-out settings are offered to users too: check them as if set.
        let uncommented: String = text
            .lines()
            .map(|line| {
                line.strip_prefix("# ")
                    .filter(|l| l.contains(" = "))
                    .unwrap_or(line)
            })
            .collect::<Vec<_>>()
            .join("\n");
        let body = hcl::parse(&uncommented).map_err(|e| format!("{}: {e}", path.display()))?;
        for attribute in body.attributes() {
            if !declared.contains(attribute.key()) {
                problems.push(format!(
                    "{}: sets {}, which infra/ does not declare",
                    path.display(),
                    attribute.key()
                ));
            }
        }
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repository() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    /// The real infra/, with one file's text replaced.
    fn problems_with(file: &str, from: &str, to: &str) -> Vec<String> {
        let mut bodies = parse_dir(&repository().join("infra")).unwrap();
        let (path, body) = bodies.iter_mut().find(|(p, _)| p.ends_with(file)).unwrap();
        let text = std::fs::read_to_string(&*path).unwrap();
        assert!(text.contains(from), "{file} no longer contains {from:?}");
        *body = hcl::parse(&text.replacen(from, to, 1)).unwrap();
        check(&bodies, FUNCTIONS, TABLES)
    }

    #[test]
    fn the_real_infrastructure_agrees_with_the_code() {
        let problems = check_repository(&repository()).unwrap();
        assert!(
            problems.is_empty(),
            "code and infra/ disagree:\n{}",
            problems.join("\n")
        );
    }

    #[test]
    fn a_wrong_environment_variable_is_caught() {
        let problems = problems_with(
            "functions.tf",
            "TELEMETRY_STREAM   = var.bus",
            "TELEMETRY_STREAMS  = var.bus",
        );
        assert!(
            problems.contains(
                &"function ingest: reads TELEMETRY_STREAM, which Terraform does not set"
                    .to_string()
            ),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("sets TELEMETRY_STREAMS")),
            "{problems:?}"
        );
    }

    #[test]
    fn a_producer_without_the_kafka_secret_is_caught() {
        // The ingest function's Kafka branch: no statement for the brokers' secret.
        let problems = problems_with(
            "functions.tf",
            "] : local.kafka_secret_statements, [\n    {\n      sid       = \"AdmitMetricNames\"",
            "] : [], [\n    {\n      sid       = \"AdmitMetricNames\"",
        );
        assert!(
            problems.contains(&"function ingest: its role does not allow secretsmanager:GetSecretValue on var.kafka_secret_arn".to_string()),
            "{problems:?}"
        );
    }

    #[test]
    fn a_kafka_secret_reader_without_its_kms_key_is_caught() {
        let problems = problems_with(
            "functions.tf",
            "actions   = [\"kms:Decrypt\"]",
            "actions   = [\"kms:Encrypt\"]",
        );
        for function in ["ingest", "anomaly-inspector", "geo-update", "archiver"] {
            assert!(
                problems.contains(&format!(
                    "function {function}: its role does not allow kms:Decrypt on var.kafka_secret_kms_key_arn"
                )),
                "{function}: {problems:?}"
            );
        }
    }

    #[test]
    fn a_mapping_default_that_drifts_from_the_runner_is_caught() {
        let problems = problems_with("variables.tf", "default     = 100\n", "default     = 500\n");
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("variable stream_batch_size:")),
            "{problems:?}"
        );
    }

    #[test]
    fn a_missing_iam_action_is_caught() {
        let problems = problems_with(
            "functions.tf",
            "sid       = \"WritePositions\"\n      actions   = [\"dynamodb:PutItem\"]",
            "sid       = \"WritePositions\"\n      actions   = [\"dynamodb:UpdateItem\"]",
        );
        assert!(
            problems.contains(&"function geo-update: its role does not allow dynamodb:PutItem on aws_dynamodb_table.positions".to_string()),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("allows dynamodb:UpdateItem on aws_dynamodb_table.positions")),
            "{problems:?}"
        );
    }

    #[test]
    fn a_missing_stream_permission_is_caught() {
        let problems = problems_with("functions.tf", r#""kinesis:GetRecords", "#, "");
        assert_eq!(
            problems
                .iter()
                .filter(|p| p.contains("does not allow kinesis:GetRecords"))
                .count(),
            3,
            "each stream function needs it: {problems:?}"
        );
    }

    #[test]
    fn magnetic_store_writes_without_a_rejected_data_location_are_caught() {
        let problems = problems_with(
            "data.tf",
            "magnetic_store_rejected_data_location {",
            "unused_location {",
        );
        assert_eq!(
            problems,
            ["Timestream table readings: magnetic store writes without a rejected-data location"]
        );
    }

    #[test]
    fn a_renamed_index_or_key_is_caught() {
        let problems = problems_with(
            "data.tf",
            r#"name            = "by-state""#,
            r#"name            = "by_state""#,
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("index by-state is not declared")),
            "{problems:?}"
        );
        let problems = problems_with(
            "data.tf",
            r#"hash_key     = "alert_id""#,
            r#"hash_key     = "id""#,
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("hash key is Some(\"id\")")),
            "{problems:?}"
        );
    }
}
