#!/bin/sh
# Generated from infra/access.yaml by `osteo access render-minio`; do not edit.
set -eu
mc alias set osteo "${MINIO_URL:-http://minio:9000}" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing osteo/osteo-training
mc mb --ignore-existing osteo/osteo-retraining
mc mb --ignore-existing osteo/osteo-patient-files
mc mb --ignore-existing osteo/osteo-identity-vault
mc mb --ignore-existing osteo/osteo-models
mc mb --ignore-existing --with-lock osteo/osteo-audit
mc retention set --default compliance "20y" osteo/osteo-audit
mc admin policy create osteo osteo-administrator /osteo/policies/administrator.json
mc admin user add osteo "$OSTEO_ADMINISTRATOR_ACCESS_KEY" "$OSTEO_ADMINISTRATOR_SECRET_KEY"
mc admin policy attach osteo osteo-administrator --user "$OSTEO_ADMINISTRATOR_ACCESS_KEY"
mc admin policy create osteo osteo-data_engineer /osteo/policies/data_engineer.json
mc admin user add osteo "$OSTEO_DATA_ENGINEER_ACCESS_KEY" "$OSTEO_DATA_ENGINEER_SECRET_KEY"
mc admin policy attach osteo osteo-data_engineer --user "$OSTEO_DATA_ENGINEER_ACCESS_KEY"
mc admin policy create osteo osteo-data_scientist /osteo/policies/data_scientist.json
mc admin user add osteo "$OSTEO_DATA_SCIENTIST_ACCESS_KEY" "$OSTEO_DATA_SCIENTIST_SECRET_KEY"
mc admin policy attach osteo osteo-data_scientist --user "$OSTEO_DATA_SCIENTIST_ACCESS_KEY"
mc admin policy create osteo osteo-auditor /osteo/policies/auditor.json
mc admin user add osteo "$OSTEO_AUDITOR_ACCESS_KEY" "$OSTEO_AUDITOR_SECRET_KEY"
mc admin policy attach osteo osteo-auditor --user "$OSTEO_AUDITOR_ACCESS_KEY"
mc admin policy create osteo osteo-radiologist /osteo/policies/radiologist.json
mc admin user add osteo "$OSTEO_RADIOLOGIST_ACCESS_KEY" "$OSTEO_RADIOLOGIST_SECRET_KEY"
mc admin policy attach osteo osteo-radiologist --user "$OSTEO_RADIOLOGIST_ACCESS_KEY"
mc admin policy create osteo osteo-svc_pseudonymise /osteo/policies/svc_pseudonymise.json
mc admin user add osteo "$OSTEO_SVC_PSEUDONYMISE_ACCESS_KEY" "$OSTEO_SVC_PSEUDONYMISE_SECRET_KEY"
mc admin policy attach osteo osteo-svc_pseudonymise --user "$OSTEO_SVC_PSEUDONYMISE_ACCESS_KEY"
mc admin policy create osteo osteo-svc_prepare /osteo/policies/svc_prepare.json
mc admin user add osteo "$OSTEO_SVC_PREPARE_ACCESS_KEY" "$OSTEO_SVC_PREPARE_SECRET_KEY"
mc admin policy attach osteo osteo-svc_prepare --user "$OSTEO_SVC_PREPARE_ACCESS_KEY"
mc admin policy create osteo osteo-svc_train /osteo/policies/svc_train.json
mc admin user add osteo "$OSTEO_SVC_TRAIN_ACCESS_KEY" "$OSTEO_SVC_TRAIN_SECRET_KEY"
mc admin policy attach osteo osteo-svc_train --user "$OSTEO_SVC_TRAIN_ACCESS_KEY"
mc admin policy create osteo osteo-svc_monitor /osteo/policies/svc_monitor.json
mc admin user add osteo "$OSTEO_SVC_MONITOR_ACCESS_KEY" "$OSTEO_SVC_MONITOR_SECRET_KEY"
mc admin policy attach osteo osteo-svc_monitor --user "$OSTEO_SVC_MONITOR_ACCESS_KEY"
mc admin policy create osteo osteo-svc_retention /osteo/policies/svc_retention.json
mc admin user add osteo "$OSTEO_SVC_RETENTION_ACCESS_KEY" "$OSTEO_SVC_RETENTION_SECRET_KEY"
mc admin policy attach osteo osteo-svc_retention --user "$OSTEO_SVC_RETENTION_ACCESS_KEY"
