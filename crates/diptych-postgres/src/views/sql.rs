//! The escape hatch's plumbing: `{collection}` placeholders, and JSON
//! parameters converted to the types PostgreSQL inferred for them.

use diptych_core::ViewError;
use serde_json::Value;
use tokio_postgres::types::{ToSql, Type};

/// A parameter ready to bind.
pub(crate) type Parameter = Box<dyn ToSql + Sync + Send>;

pub(crate) use diptych_core::backend_kit::substitute_tables;

/// Converts the statement's JSON parameters to the types PostgreSQL inferred
/// for its placeholders (`types`, from preparing it).
pub(crate) fn parameters(values: &[Value], types: &[Type]) -> Result<Vec<Parameter>, ViewError> {
    if values.len() != types.len() {
        return Err(ViewError::InvalidQuery(format!(
            "the SQL has {} parameters and {} values were given",
            types.len(),
            values.len()
        )));
    }
    values
        .iter()
        .zip(types)
        .enumerate()
        .map(|(index, (value, ty))| {
            parameter(value, ty).ok_or_else(|| {
                ViewError::InvalidQuery(format!(
                    "parameter ${} is a {ty} in the SQL and cannot take {value}: pass a value of \
                     that type, or cast the placeholder (`${}::text::{ty}`)",
                    index + 1,
                    index + 1
                ))
            })
        })
        .collect()
}

/// One value as a `ty`; `None` when it does not fit. Booleans fit integer
/// columns as 1 and 0, as they do in SQLite; any scalar fits text.
fn parameter(value: &Value, ty: &Type) -> Option<Parameter> {
    let integer = || match value {
        Value::Bool(flag) => Some(i64::from(*flag)),
        _ => value.as_i64(),
    };
    let text = || match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    let null = value.is_null();
    Some(match *ty {
        Type::BOOL if null => Box::new(None::<bool>),
        Type::BOOL => Box::new(value.as_bool()?),
        Type::INT2 if null => Box::new(None::<i16>),
        Type::INT2 => Box::new(i16::try_from(integer()?).ok()?),
        Type::INT4 if null => Box::new(None::<i32>),
        Type::INT4 => Box::new(i32::try_from(integer()?).ok()?),
        Type::INT8 if null => Box::new(None::<i64>),
        Type::INT8 => Box::new(integer()?),
        Type::FLOAT4 if null => Box::new(None::<f32>),
        Type::FLOAT4 => Box::new(value.as_f64()? as f32),
        Type::FLOAT8 if null => Box::new(None::<f64>),
        Type::FLOAT8 => Box::new(value.as_f64()?),
        Type::JSON | Type::JSONB => Box::new(value.clone()),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN if null => {
            Box::new(None::<String>)
        }
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => Box::new(text()),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn placeholders_become_tables_and_unknown_ones_are_refused() {
        let tables =
            std::collections::BTreeMap::from([("orders".to_owned(), "doc_3_1".to_owned())]);
        assert_eq!(
            substitute_tables("SELECT count(*) FROM {orders}", &tables).expect("substituted"),
            "SELECT count(*) FROM doc_3_1"
        );
        assert!(matches!(
            substitute_tables("SELECT * FROM {nothing}", &tables),
            Err(ViewError::UnknownCollection(name)) if name == "nothing"
        ));
        assert!(matches!(
            substitute_tables("SELECT * FROM {orders", &tables),
            Err(ViewError::InvalidQuery(_))
        ));
    }

    #[test]
    fn parameters_take_the_inferred_types_or_say_what_to_do() {
        let converted = parameters(
            &[json!(true), json!(7), json!("x"), Value::Null],
            &[Type::INT8, Type::INT4, Type::TEXT, Type::FLOAT8],
        );
        assert_eq!(converted.map(|values| values.len()).ok(), Some(4));
        assert!(parameters(&[json!(70000)], &[Type::INT2]).is_err());
        assert!(matches!(
            parameters(&[json!(1)], &[Type::NUMERIC]),
            Err(ViewError::InvalidQuery(message)) if message.contains("$1::text::numeric")
        ));
        assert!(parameters(&[json!(1)], &[]).is_err());
    }
}
