BEGIN TRANSACTION;
CREATE TABLE adapter_versions (
	id INTEGER NOT NULL, 
	name VARCHAR(64) NOT NULL, 
	version INTEGER NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	created DATETIME NOT NULL, 
	base_name VARCHAR(64) NOT NULL, 
	base_fingerprint VARCHAR(64) NOT NULL, 
	base_source VARCHAR, 
	quantization VARCHAR(32), 
	parent_version INTEGER, 
	dataset_sha256 VARCHAR(64), 
	dataset_rows INTEGER, 
	dataset_source VARCHAR, 
	train_config JSON, 
	seed INTEGER, 
	train_metrics JSON, 
	lib_versions JSON, 
	chat_template_sha256 VARCHAR(64), 
	sha256 VARCHAR(64) NOT NULL, 
	size BIGINT NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_adapter_name_version UNIQUE (name, version)
);
INSERT INTO "adapter_versions" VALUES(1,'acme-support',1,'ready','2026-11-25 07:11:32.626663','tiny-v1','f5581eda48bdedc5ba62c347f9c10dd7959dc1debe244c054429ffa0967f808e','hand-made:tiny-v1','nf4',NULL,'dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd',24,'acme.jsonl','{"rank": 16, "alpha": 32, "lr": 0.0002, "targets": "all-linear", "epochs": 1, "tags": {"customer": "acme"}, "quantize": "nf4", "eval_split": 0.1}',7,'{"final_loss": 1.375, "steps": 12, "runtime_s": 3.5, "tokens_per_s": 812.5, "loss_curve": [[1, 2.5], [6, 1.75], [12, 1.375]], "heldout_rows": 3, "heldout_samples": {"adapter": ["ok"], "expected": ["ok \u2713"]}, "resumed": false}','{"hatrack": "0.1.0", "torch": "2.13.0", "peft": "0.17.0"}','2f3f666573313d2b0849e1037ccb379ce3a75eb687eccf69f077257e055b93bd','4e6637e94a860892d6caea6a39bbf7af0a2cda5739f42f19356de661c7de59ef',880);
INSERT INTO "adapter_versions" VALUES(2,'acme-support',2,'ready','2026-11-25 07:11:32.651280','tiny-v1','f5581eda48bdedc5ba62c347f9c10dd7959dc1debe244c054429ffa0967f808e','hand-made:tiny-v1','nf4',1,'eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee',30,'acme-more.jsonl','{"rank": 16, "alpha": 32, "lr": 0.0002, "targets": "all-linear", "epochs": 1, "tags": {"customer": "acme"}, "quantize": "nf4", "eval_split": 0.1, "resume": true}',8,'{"final_loss": 1.125, "steps": 12, "runtime_s": 3.5, "tokens_per_s": 812.5, "loss_curve": [[1, 2.5], [6, 1.75], [12, 1.375]], "heldout_rows": 3, "heldout_samples": {"adapter": ["ok"], "expected": ["ok \u2713"]}, "resumed": false}','{"hatrack": "0.1.0", "torch": "2.13.0", "peft": "0.17.0"}','2f3f666573313d2b0849e1037ccb379ce3a75eb687eccf69f077257e055b93bd','9e2d28bf0fdc02f5731c12768dfa434307ab478ccdcbc6fdf5483360da23b9ee',880);
INSERT INTO "adapter_versions" VALUES(3,'acme-support',3,'ready','2026-11-25 07:11:32.686120','tiny-v1','f5581eda48bdedc5ba62c347f9c10dd7959dc1debe244c054429ffa0967f808e','hand-made:tiny-v1',NULL,NULL,NULL,NULL,NULL,'null',NULL,'null','null','2f3f666573313d2b0849e1037ccb379ce3a75eb687eccf69f077257e055b93bd','4e6637e94a860892d6caea6a39bbf7af0a2cda5739f42f19356de661c7de59ef',880);
INSERT INTO "adapter_versions" VALUES(4,'globex-faq',1,'ready','2026-11-25 07:11:32.700642','plain-base','e4109d996b8a084e533701ab0ca9484165d763c2f01188c49e234f65f70b759c','hand-made:plain-base',NULL,NULL,NULL,NULL,NULL,'null',0,'{"final_loss": null, "steps": 0}','null',NULL,'9d6b3ce681ec2d240afd1a5b70c162726eadb84b16a8debe4ae29888103f1af6',880);
CREATE TABLE alias_history (
	id INTEGER NOT NULL, 
	name VARCHAR(64) NOT NULL, 
	alias VARCHAR(64) NOT NULL, 
	from_version INTEGER, 
	to_version INTEGER, 
	forced BOOLEAN NOT NULL, 
	created DATETIME NOT NULL, 
	PRIMARY KEY (id)
);
INSERT INTO "alias_history" VALUES(1,'acme-support','prod',NULL,1,0,'2026-11-25 07:11:32.732131');
INSERT INTO "alias_history" VALUES(2,'acme-support','prod',1,2,0,'2026-11-25 07:11:32.742757');
INSERT INTO "alias_history" VALUES(3,'acme-support','staging',NULL,3,0,'2026-11-25 07:11:32.746591');
INSERT INTO "alias_history" VALUES(4,'acme-support','canary',NULL,3,0,'2026-11-25 07:11:32.754604');
INSERT INTO "alias_history" VALUES(5,'acme-support','canary',3,NULL,0,'2026-11-25 07:11:32.757939');
INSERT INTO "alias_history" VALUES(6,'globex-faq','prod',NULL,1,1,'2026-11-25 07:11:32.767466');
CREATE TABLE aliases (
	id INTEGER NOT NULL, 
	name VARCHAR(64) NOT NULL, 
	alias VARCHAR(64) NOT NULL, 
	version INTEGER NOT NULL, 
	updated DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_alias_name_alias UNIQUE (name, alias)
);
INSERT INTO "aliases" VALUES(1,'acme-support','prod',2,'2026-11-25 07:11:32.742656');
INSERT INTO "aliases" VALUES(2,'acme-support','staging',3,'2026-11-25 07:11:32.746548');
INSERT INTO "aliases" VALUES(3,'globex-faq','prod',1,'2026-11-25 07:11:32.767421');
CREATE TABLE api_keys (
	id VARCHAR(32) NOT NULL, 
	tenant VARCHAR(64) NOT NULL, 
	patterns JSON NOT NULL, 
	secret_sha256 VARCHAR(64) NOT NULL, 
	created DATETIME NOT NULL, 
	revoked DATETIME, 
	PRIMARY KEY (id)
);
INSERT INTO "api_keys" VALUES('key_a34f776dfde6','acme','["acme-*"]','228227856bf022431edabf6870543be9f352ad66b84a4333be0bd13b07cd0260','2026-11-25 07:11:32.777473',NULL);
INSERT INTO "api_keys" VALUES('key_8444c186e415','globex','["globex-faq", "shared-*"]','a5128ccd5c53879934378d5952522485789d88e0abd24ac5ab921253406d0f80','2026-11-25 07:11:32.781380','2026-11-25 07:11:32.784433');
CREATE TABLE base_models (
	id INTEGER NOT NULL, 
	name VARCHAR(64) NOT NULL, 
	source VARCHAR NOT NULL, 
	path VARCHAR NOT NULL, 
	fingerprint VARCHAR(64) NOT NULL, 
	chat_template_sha256 VARCHAR(64), 
	created DATETIME NOT NULL, 
	PRIMARY KEY (id)
);
INSERT INTO "base_models" VALUES(1,'tiny-v1','hand-made:tiny-v1','/tmp/tmpslz3ossi/bases/tiny-v1','f5581eda48bdedc5ba62c347f9c10dd7959dc1debe244c054429ffa0967f808e','2f3f666573313d2b0849e1037ccb379ce3a75eb687eccf69f077257e055b93bd','2026-11-25 07:11:32.607915');
INSERT INTO "base_models" VALUES(2,'plain-base','hand-made:plain-base','/tmp/tmpslz3ossi/bases/plain-base','e4109d996b8a084e533701ab0ca9484165d763c2f01188c49e234f65f70b759c',NULL,'2026-11-25 07:11:32.610203');
CREATE TABLE schema_version (
	id INTEGER NOT NULL, 
	version INTEGER NOT NULL, 
	PRIMARY KEY (id)
);
INSERT INTO "schema_version" VALUES(1,1);
CREATE TABLE scores (
	id INTEGER NOT NULL, 
	version_id INTEGER NOT NULL, 
	metric VARCHAR(64) NOT NULL, 
	value FLOAT NOT NULL, 
	base_value FLOAT, 
	dataset_sha256 VARCHAR(64), 
	split VARCHAR(256) NOT NULL, 
	created DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(version_id) REFERENCES adapter_versions (id) ON DELETE CASCADE
);
INSERT INTO "scores" VALUES(1,1,'eval_loss',1.5,2.25,'dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd','heldout','2026-11-25 07:11:32.628249');
INSERT INTO "scores" VALUES(2,1,'perplexity',2.82842712474619029094e+00,4.75682846001088410758e+00,'dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd','heldout','2026-11-25 07:11:32.628324');
INSERT INTO "scores" VALUES(3,1,'exact_match',0.375,0.125,'dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd','heldout','2026-11-25 07:11:32.628374');
INSERT INTO "scores" VALUES(4,1,'contains',0.5,NULL,'dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd','heldout','2026-11-25 07:11:32.630175');
INSERT INTO "scores" VALUES(5,2,'eval_loss',1.25,2.25,'dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd','heldout','2026-11-25 07:11:32.651773');
INSERT INTO "scores" VALUES(6,2,'perplexity',2.37841423000544205379e+00,4.75682846001088410758e+00,'dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd','heldout','2026-11-25 07:11:32.651820');
INSERT INTO "scores" VALUES(7,2,'exact_match',0.375,0.125,'dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd','heldout','2026-11-25 07:11:32.651859');
INSERT INTO "scores" VALUES(8,2,'contains',0.5,NULL,'dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd','heldout','2026-11-25 07:11:32.651894');
INSERT INTO "scores" VALUES(9,4,'eval_loss',0.75,0.5,'dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd','heldout','2026-11-25 07:11:32.701175');
INSERT INTO "scores" VALUES(10,4,'perplexity',1.68179283050742900407e+00,1.41421356237309514547e+00,'dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd','heldout','2026-11-25 07:11:32.701263');
INSERT INTO "scores" VALUES(11,2,'eval_loss',1.0,2.0,'dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd','eval:extra.jsonl','2026-11-25 07:11:32.707510');
INSERT INTO "scores" VALUES(12,2,'perplexity',2.0,4.0,'dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd','eval:extra.jsonl','2026-11-25 07:11:32.707587');
INSERT INTO "scores" VALUES(13,2,'exact_match',0.375,0.125,'dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd','eval:extra.jsonl','2026-11-25 07:11:32.707627');
INSERT INTO "scores" VALUES(14,2,'contains',0.5,NULL,'dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd','eval:extra.jsonl','2026-11-25 07:11:32.707663');
CREATE TABLE tags (
	id INTEGER NOT NULL, 
	version_id INTEGER NOT NULL, 
	"key" VARCHAR(64) NOT NULL, 
	value VARCHAR(256) NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_tag_version_key UNIQUE (version_id, "key"), 
	FOREIGN KEY(version_id) REFERENCES adapter_versions (id) ON DELETE CASCADE
);
INSERT INTO "tags" VALUES(1,1,'customer','acme');
INSERT INTO "tags" VALUES(2,1,'team','support');
INSERT INTO "tags" VALUES(3,2,'customer','acme');
INSERT INTO "tags" VALUES(4,4,'customer','globex');
INSERT INTO "tags" VALUES(5,4,'note','naïve ✓ ''quoted''');
INSERT INTO "tags" VALUES(6,3,'stage','candidate');
CREATE UNIQUE INDEX ix_base_models_name ON base_models (name);
CREATE INDEX ix_adapter_versions_base_name ON adapter_versions (base_name);
CREATE INDEX ix_adapter_versions_dataset_sha256 ON adapter_versions (dataset_sha256);
CREATE INDEX ix_adapter_versions_name ON adapter_versions (name);
CREATE INDEX ix_adapter_versions_sha256 ON adapter_versions (sha256);
CREATE INDEX ix_aliases_name ON aliases (name);
CREATE INDEX ix_alias_history_name ON alias_history (name);
CREATE UNIQUE INDEX ix_api_keys_secret_sha256 ON api_keys (secret_sha256);
CREATE INDEX ix_tags_version_id ON tags (version_id);
CREATE INDEX ix_scores_version_id ON scores (version_id);
COMMIT;
